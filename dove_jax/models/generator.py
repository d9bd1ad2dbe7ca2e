"""The dynamic token generator f_phi: a causal GPT-NeoX that reads the image features (and optionally a text
query) and writes one continuous token and one EOS probability per output slot, all in one forward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dove_jax.models import eos
from dove_jax.models.embeddings import grid_encoding, timestep_encoding
from dove_jax.models.neox import NeoXTransformer


class TokenGenerator(nnx.Module):
  """[features; query; t_1..t_n] -> causal transformer -> tokens d_1..d_n and p_eos(1..n).

  Because attention is causal, slot i sees the image, the query and slots < i only: token i never depends
  on how many tokens come after it, which is what lets a shorter sequence be a prefix of a longer one.
  """

  def __init__(
      self,
      *,
      feature_dim: int,
      grid_size: int,
      max_tokens: int,
      transformer: dict,
      eos_bias_init: float = -4.0,
      token_dim: int = 0,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    width = transformer["d_model"]
    self.max_tokens = max_tokens
    self.token_dim = token_dim or width
    self.feature_proj = nnx.Linear(feature_dim, width, dtype=dtype, rngs=rngs)
    # Where each feature sits on the grid: learned, starting from the 2-D sin-cos encoding.
    self.feature_positions = nnx.Param(jnp.asarray(grid_encoding(grid_size, width)))  # [P, W]
    self.transformer = NeoXTransformer(**transformer, causal=True, dtype=dtype, rngs=rngs)
    # A negative bias makes EOS rare at first, so training starts from full-length sequences.
    self.eos_head = nnx.Linear(
        width, 1, bias_init=nnx.initializers.constant(eos_bias_init), dtype=dtype, rngs=rngs
    )
    # A token narrower than the transformer holds less, so each added token has something left to add.
    self.token_out = nnx.Linear(width, token_dim, dtype=dtype, rngs=rngs) if token_dim else None

  def __call__(
      self, features: jax.Array, query: jax.Array | None = None, query_mask: jax.Array | None = None
  ) -> tuple[jax.Array, jax.Array]:
    """features [B, P, feature_dim]; query [B, Q, width] with query_mask [B, Q] (False = padding).

    Returns tokens [B, n, token_dim] and eos_prob [B, n].
    """
    x, positions, key_mask = self.inputs(features, query, query_mask)
    return self.outputs(x, positions, key_mask)

  def inputs(self, features, query=None, query_mask=None):
    """The transformer's input sequence [B, P + Q + n, W], its rotary positions and its key mask."""
    prefix, prefix_mask = self.prefix(features, query, query_mask)  # [B, S, W], [B, S]
    key_mask = slot_key_mask(prefix_mask, self.max_tokens)
    slots = self.slot_inputs(prefix.shape[0], self.max_tokens, prefix.dtype)
    return jnp.concatenate([prefix, slots], axis=1), rotary_positions(key_mask), key_mask

  def prefix(self, features, query=None, query_mask=None):
    """What the slots read: [features; query] [B, P + Q, W] and its key mask [B, P + Q] (False = padding)."""
    parts = [
        self.feature_proj(features) + self.feature_positions[...].astype(features.dtype)
    ]  # [B, P, W]
    valid = [jnp.ones(parts[0].shape[:2], bool)]
    if query is not None:
      parts.append(query.astype(parts[0].dtype))
      valid.append(
          jnp.ones(query.shape[:2], bool) if query_mask is None else query_mask.astype(bool)
      )
    return jnp.concatenate(parts, axis=1), jnp.concatenate(valid, axis=1)

  def slot_inputs(self, batch: int, num_slots: int, dtype) -> jax.Array:
    """t_1..t_num_slots for every image, [B, num_slots, W] (fixed, not learned)."""
    slots = jnp.asarray(
        timestep_encoding(num_slots, self.feature_positions.shape[-1]), dtype
    )  # [n, W]
    return jnp.broadcast_to(slots, (batch, *slots.shape))

  def outputs(self, x, positions, key_mask):
    """The last n positions of the transformer's output: tokens [B, n, token_dim] and eos_prob [B, n]."""
    out = self.transformer(x, positions=positions, key_mask=key_mask, num_outputs=self.max_tokens)
    return self.tokens(out), self.eos_probability(out)

  def tokens(self, out: jax.Array) -> jax.Array:
    """Transformer outputs [B, n, W] -> tokens [B, n, token_dim] (the outputs themselves without token_dim)."""
    return out if self.token_out is None else self.token_out(out)

  def eos_probability(self, out: jax.Array) -> jax.Array:
    """Transformer outputs [B, n, W] -> p_eos [B, n] float32."""
    return jax.nn.sigmoid(self.eos_head(out)[..., 0].astype(jnp.float32))

  def generate(
      self,
      features: jax.Array,
      query: jax.Array | None = None,
      query_mask: jax.Array | None = None,
      *,
      token_budget: jax.Array | int | None = None,
      threshold: float = 0.5,
      chunk_size: int = 16,
  ) -> tuple[jax.Array, jax.Array]:
    """`__call__`'s tokens and EOS, computed only as far as the batch needs them: cheaper for short sequences.

    The prefix [features; query] runs once into a key/value cache; then the slots run `chunk_size` at a
    time in a `lax.while_loop` that stops once every image is done: its EOS fired (eos_prob > threshold) or,
    for a forced budget (as `eos.eos_mask`: int or [B]; k >= 1 forces min(k, n), <= 0 = predicted), its
    min(k, n) slots exist. Shapes are static, so new budgets or lengths never recompile; the loop's length
    is data.

    Returns tokens [B, n, W] and eos_prob [B, n] equal to `__call__`'s (up to float rounding) on every slot
    the loop computed, which covers every image's length, so `eos.eos_mask` on them gives the same mask and
    lengths. Slots never computed hold tokens 0 and eos_prob 1.0 (an EOS that already fired): a forced
    image's own prediction is only known within the computed slots.
    """
    prefix, prefix_mask = self.prefix(features, query, query_mask)  # [B, S, W], [B, S]
    b, s, _ = prefix.shape
    n = self.max_tokens
    num_chunks = -(-n // chunk_size)
    padded = (
        num_chunks * chunk_size
    )  # equal chunks; causal, so slots past n change nothing before them
    key_mask = slot_key_mask(prefix_mask, padded)  # [B, S + n']
    positions = rotary_positions(key_mask)  # [B, S + n']
    slots = self.slot_inputs(b, padded, prefix.dtype)  # [B, n', W]
    caches = self.transformer.init_cache(b, s + padded)
    _, caches = self.transformer.extend(
        prefix, positions[:, :s], caches, 0, key_mask, compute_output=False
    )
    forced = eos.forced_lengths(token_budget, b, n)  # [B], 0 = stop at the EOS

    def unfinished(carry):
      done_slots, _, _, _, fired = carry
      done = jnp.where(forced > 0, done_slots >= forced, fired | (done_slots >= n))  # [B]
      return ~jnp.all(done)

    def next_chunk(carry):
      done_slots, caches, tokens, eos_prob, fired = carry
      x = jax.lax.dynamic_slice_in_dim(slots, done_slots, chunk_size, axis=1)  # [B, C, W]
      chunk_positions = jax.lax.dynamic_slice_in_dim(
          positions, s + done_slots, chunk_size, axis=1
      )  # [B, C]
      out, caches = self.transformer.extend(x, chunk_positions, caches, s + done_slots, key_mask)
      chunk_eos = self.eos_probability(out)  # [B, C]
      tokens = jax.lax.dynamic_update_slice_in_dim(
          tokens, self.tokens(out).astype(tokens.dtype), done_slots, axis=1
      )
      eos_prob = jax.lax.dynamic_update_slice_in_dim(eos_prob, chunk_eos, done_slots, axis=1)
      fired = fired | jnp.any(chunk_eos > threshold, axis=1)
      return done_slots + chunk_size, caches, tokens, eos_prob, fired

    carry = (
        jnp.int32(0),
        caches,
        jnp.zeros((b, padded, self.token_dim), jnp.float32),
        jnp.ones((b, padded), jnp.float32),
        jnp.zeros((b,), bool),
    )
    _, _, tokens, eos_prob, _ = jax.lax.while_loop(unfinished, next_chunk, carry)
    return tokens[:, :n], eos_prob[:, :n]


def slot_key_mask(prefix_mask: jax.Array, num_slots: int) -> jax.Array:
  """The key mask of [prefix; slots], [B, S + num_slots]: every slot is a valid key."""
  return jnp.concatenate([prefix_mask, jnp.ones((prefix_mask.shape[0], num_slots), bool)], axis=1)


def rotary_positions(key_mask: jax.Array) -> jax.Array:
  """[B, L] int32. Padding takes no position, so a padded query gives the same rotary phases as an unpadded
  one."""
  return jnp.cumsum(key_mask, axis=1, dtype=jnp.int32) - 1
