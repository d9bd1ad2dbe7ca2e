"""The dynamic token generator f_phi: a causal GPT-NeoX that reads the image features (and optionally a text
query) and writes one continuous token and one EOS probability per output slot, all in one forward pass."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dove_jax.models.embeddings import grid_encoding, timestep_encoding
from dove_jax.models.neox import NeoXTransformer


class TokenGenerator(nnx.Module):
  """[features; query; t_1..t_n] -> causal transformer -> tokens d_1..d_n and p_eos(1..n).

  Because attention is causal, slot i sees the image, the query and slots < i only: token i never depends
  on how many tokens come after it, which is what lets a shorter sequence be a prefix of a longer one.
  """

  def __init__(self, *, feature_dim: int, grid_size: int, max_tokens: int, transformer: dict,
               eos_bias_init: float = -4.0, dtype=None, rngs: nnx.Rngs):
    width = transformer["d_model"]
    self.max_tokens = max_tokens
    self.feature_proj = nnx.Linear(feature_dim, width, dtype=dtype, rngs=rngs)
    # Where each feature sits on the grid: learned, starting from the 2-D sin-cos encoding.
    self.feature_positions = nnx.Param(jnp.asarray(grid_encoding(grid_size, width)))  # [P, W]
    self.transformer = NeoXTransformer(**transformer, causal=True, dtype=dtype, rngs=rngs)
    # A negative bias makes EOS rare at first, so training starts from full-length sequences.
    self.eos_head = nnx.Linear(width, 1, bias_init=nnx.initializers.constant(eos_bias_init),
                               dtype=dtype, rngs=rngs)

  def __call__(self, features: jax.Array, query: jax.Array | None = None,
               query_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """features [B, P, feature_dim]; query [B, Q, width] with query_mask [B, Q] (False = padding).

    Returns tokens [B, n, width] and eos_prob [B, n].
    """
    x, positions, key_mask = self.inputs(features, query, query_mask)
    return self.outputs(x, positions, key_mask)

  def inputs(self, features, query=None, query_mask=None):
    """The transformer's input sequence [B, P + Q + n, W], its rotary positions and its key mask."""
    b = features.shape[0]
    parts = [self.feature_proj(features) + self.feature_positions[...].astype(features.dtype)]  # [B, P, W]
    valid = [jnp.ones(parts[0].shape[:2], bool)]
    if query is not None:
      parts.append(query.astype(parts[0].dtype))
      valid.append(jnp.ones(query.shape[:2], bool) if query_mask is None else query_mask.astype(bool))
    slots = jnp.asarray(timestep_encoding(self.max_tokens, parts[0].shape[-1]), parts[0].dtype)  # fixed
    parts.append(jnp.broadcast_to(slots, (b, *slots.shape)))  # [B, n, W]
    valid.append(jnp.ones((b, self.max_tokens), bool))
    key_mask = jnp.concatenate(valid, axis=1)
    # Padding takes no position, so a padded query gives the same rotary phases as an unpadded one.
    positions = jnp.cumsum(key_mask, axis=1, dtype=jnp.int32) - 1
    return jnp.concatenate(parts, axis=1), positions, key_mask

  def outputs(self, x, positions, key_mask):
    """The last n positions of the transformer's output: tokens [B, n, W] and eos_prob [B, n]."""
    out = self.transformer(x, positions=positions, key_mask=key_mask)[:, -self.max_tokens:]
    eos_prob = jax.nn.sigmoid(self.eos_head(out)[..., 0].astype(jnp.float32))
    return out, eos_prob
