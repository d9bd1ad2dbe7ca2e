"""EOS masking: turns per-slot EOS probabilities (and optional forced budgets) into a length and a mask.

Everything is a cumulative op over the slot axis with static shapes, so one compiled function serves every
mix of lengths in a batch: variable length is a mask, never a Python branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def eos_mask(
    eos_prob: jax.Array, token_budget: jax.Array | int | None = None, threshold: float = 0.5
) -> tuple[jax.Array, jax.Array]:
  """Which slots an image keeps, and how many.

  Args:
    eos_prob: [B, n] probability that slot i (1-based) ends the sequence.
    token_budget: None, an int, or [B] ints. A value k >= 1 forces length min(k, n) for that image; a value
      <= 0 leaves that image at its predicted length, so one batch can mix forced and predicted lengths.
    threshold: an EOS fires where its probability exceeds this.

  Returns:
    mask: [B, n] bool, True for slots 1..length (the slot whose EOS fired is kept).
    lengths: [B] int32, the first slot whose EOS fires, or n if none fires.
  """
  n = eos_prob.shape[-1]
  fired = (eos_prob > threshold).astype(jnp.int32)  # [B, n]
  # A slot is kept unless an EOS fired strictly before it: exclusive running max over the slot axis.
  fired_before = jnp.pad(jax.lax.cummax(fired, axis=1), ((0, 0), (1, 0)))[:, :n]
  lengths = jnp.sum(1 - fired_before, axis=1, dtype=jnp.int32)  # [B]
  if token_budget is not None:
    forced = forced_lengths(token_budget, lengths.shape[0], n)
    lengths = jnp.where(forced > 0, forced, lengths)
  return length_mask(lengths, n), lengths


def forced_lengths(token_budget: jax.Array | int | None, batch: int, n: int) -> jax.Array:
  """[B] int32: min(k, n) for an image with budget k >= 1, 0 for one left at its predicted length."""
  if token_budget is None:
    return jnp.zeros((batch,), jnp.int32)
  budget = jnp.broadcast_to(jnp.asarray(token_budget, jnp.int32), (batch,))
  return jnp.where(budget > 0, jnp.minimum(budget, n), 0)


def length_mask(lengths: jax.Array, n: int) -> jax.Array:
  """[B] lengths -> [B, n] mask, True for slots 1..length."""
  return jnp.arange(1, n + 1)[None, :] <= lengths[:, None]


def apply_mask(tokens: jax.Array, mask: jax.Array) -> jax.Array:
  """Zeroes the tokens after each image's length: exactly zero (a select, not a product, so even a
  non-finite value in a dropped slot cannot leak through)."""
  return jnp.where(mask[..., None], tokens, jnp.zeros((), tokens.dtype))  # [B, n, D]
