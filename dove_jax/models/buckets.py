"""Length-bucketed decoding: the token decoder reads only as many slots as the batch's longest sequence needs.

Every slot after an image's length is a masked-out key, so cutting the slot axis to any m >= the longest
length changes nothing but the cost. The cut must be a static shape, so it is rounded up to a bucket, and
`lax.switch` picks the bucket on the device: one compiled program holds a branch per bucket and runs only the
chosen one, with no host sync to read the lengths. Use it as `DOVE.decode(tokens, bucket_sizes(n))`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dove_jax.models.token_decoder import TokenDecoder


def bucket_sizes(max_tokens: int, smallest: int = 16) -> tuple[int, ...]:
  """Powers of two from `smallest` below `max_tokens`, then `max_tokens`: (16, 32, 64, 128, 256) for 256."""
  sizes = [
      size
      for size in (smallest * 2**i for i in range(max_tokens.bit_length()))
      if size < max_tokens
  ]
  return (*sizes, max_tokens)


def decode_latents(token_decoder: TokenDecoder, tokens, sizes: tuple[int, ...]) -> jax.Array:
  """`token_decoder(tokens.tokens, tokens.mask)` on the smallest bucket of slots that holds every kept one.

  tokens: a `Tokens` batch with n slots; sizes: increasing bucket sizes, the last one n.
  Returns latents [B, h, w, C].
  """
  n = tokens.mask.shape[1]
  if sizes[-1] != n:
    raise ValueError(f"the largest bucket must be the number of slots {n}; got buckets {sizes}")

  def cut_to(size):
    return lambda: token_decoder(tokens.tokens[:, :size], tokens.mask[:, :size], num_slots=n)

  longest = jnp.max(tokens.lengths)
  index = jnp.searchsorted(
      jnp.asarray(sizes, jnp.int32), longest
  )  # the first bucket >= the longest length
  return jax.lax.switch(jnp.minimum(index, len(sizes) - 1), [cut_to(size) for size in sizes])
