"""The token decoder: a bidirectional GPT-NeoX that maps the masked token sequence back to the latent grid."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dove_jax.models.embeddings import grid_encoding
from dove_jax.models.neox import NeoXTransformer


class TokenDecoder(nnx.Module):
  """[tokens d_1..d_n; one learned query per latent position] -> transformer -> [B, h, w, latent_dim].

  Dropped slots are masked out as attention keys, so the decoder sees exactly the kept tokens; the latent
  queries read from them and from each other.
  """

  def __init__(
      self,
      *,
      token_dim: int,
      latent_dim: int,
      grid_size: int,
      transformer: dict,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    width = transformer["d_model"]
    self.grid_size = grid_size
    self.token_proj = nnx.Linear(token_dim, width, dtype=dtype, rngs=rngs)
    # One learned query per latent cell, starting from its 2-D sin-cos position so cells differ from step 0.
    self.latent_queries = nnx.Param(jnp.asarray(grid_encoding(grid_size, width)))  # [P, W]
    self.transformer = NeoXTransformer(**transformer, causal=False, dtype=dtype, rngs=rngs)
    self.latent_out = nnx.Linear(width, latent_dim, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, mask: jax.Array, num_slots: int | None = None) -> jax.Array:
    """tokens [B, m, token_dim], mask [B, m] -> latents [B, h, w, latent_dim].

    `num_slots` (default m) is the n the rotary positions are laid out for: the latent queries sit at
    n..n+P-1. Given the full n, the first m slots of a longer sequence (when every slot after m is dropped)
    decode exactly as the whole sequence does, at the cost of m slots instead of n.
    """
    b, m = mask.shape
    n = m if num_slots is None else num_slots
    x = self.token_proj(tokens)  # [B, m, W]
    queries = jnp.broadcast_to(
        self.latent_queries[...].astype(x.dtype), (b, *self.latent_queries.shape)
    )
    x = jnp.concatenate([x, queries], axis=1)  # [B, m + P, W]
    key_mask = jnp.concatenate([mask.astype(bool), jnp.ones(queries.shape[:2], bool)], axis=1)
    positions = jnp.concatenate(
        [jnp.arange(m, dtype=jnp.int32), n + jnp.arange(queries.shape[1], dtype=jnp.int32)]
    )
    positions = jnp.broadcast_to(positions, key_mask.shape)  # [B, m + P]
    out = self.transformer(
        x, positions=positions, key_mask=key_mask, num_outputs=queries.shape[1]
    )  # [B, P, W]
    return self.latent_out(out).reshape(b, self.grid_size, self.grid_size, -1)
