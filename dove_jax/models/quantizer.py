"""Nearest-neighbour vector quantizer of a VQGAN, matching diffusers' `VectorQuantizer` (legacy=True).

diffusers' `VQModel` uses this quantizer with beta=0.25 and the 'legacy' loss, where beta weighs the codebook
term rather than the commitment term (a bug kept there for backward compatibility; kept here so that losses
of converted checkpoints match).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.scipy.special import xlogy


@struct.dataclass
class QuantizerOutput:
  """Result of quantizing a latent grid; every field is an array, so it crosses `jax.jit` as a pytree."""

  quantized: jax.Array  # [B, h, w, C] codebook vectors, with straight-through gradient to the input
  indices: jax.Array  # [B, h, w] int32 code ids
  loss: jax.Array  # [] commitment_loss + beta * codebook_loss (diffusers legacy weighting)
  codebook_loss: jax.Array  # [] mean((z_q - sg(z))^2): moves the codes towards the encoder outputs
  commitment_loss: (
      jax.Array
  )  # [] mean((sg(z_q) - z)^2): moves the encoder outputs towards the codes
  perplexity: jax.Array  # [] exp(entropy of the code histogram of the batch)
  code_usage: jax.Array  # [] fraction of the codebook used at least once in the batch


def squared_distances(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """|z|^2 - 2 z.e + |e|^2 for every pair of z [N, C] and codebook [K, C] -> [N, K], as torch.cdist's
  matmul path computes it.

  HIGHEST precision keeps TPU/GPU matmuls from rounding to bf16/tf32, which would change the chosen codes.
  """
  cross = jnp.matmul(z, codebook.T, precision=jax.lax.Precision.HIGHEST)  # [N, K]
  return (
      jnp.sum(z * z, axis=-1, keepdims=True) - 2.0 * cross + jnp.sum(codebook * codebook, axis=-1)
  )


def nearest_codes(z: jax.Array, codebook: jax.Array) -> jax.Array:
  """Index of the nearest code for each row of z [N, C] -> [N] int32.

  diffusers takes argmin of torch.cdist, i.e. of sqrt(max(d2, 1e-30)); the sqrt can round two close
  distances to the same float, and argmin then picks the lower index. Doing the same keeps ties identical.
  """
  distances = jnp.sqrt(jnp.maximum(squared_distances(z, codebook), 1e-30))  # [N, K]
  return jnp.argmin(distances, axis=-1).astype(jnp.int32)


def code_statistics(indices: jax.Array, num_embeddings: int) -> tuple[jax.Array, jax.Array]:
  """Perplexity and fraction of codes used, from the histogram of `indices` (any shape)."""
  counts = jnp.bincount(indices.reshape(-1), length=num_embeddings)  # [K]
  probs = counts / indices.size
  perplexity = jnp.exp(-jnp.sum(xlogy(probs, probs)))
  return perplexity, jnp.mean(counts > 0)


class VectorQuantizer(nnx.Module):
  """Maps each C-dim latent vector to its nearest codebook entry (squared euclidean distance)."""

  def __init__(self, num_embeddings: int, embed_dim: int, beta: float = 0.25, *, rngs: nnx.Rngs):
    self.num_embeddings = num_embeddings
    self.beta = beta
    # diffusers' init: uniform in [-1/K, 1/K].
    bound = 1.0 / num_embeddings
    self.embedding = nnx.Param(
        jax.random.uniform(rngs.params(), (num_embeddings, embed_dim), minval=-bound, maxval=bound)
    )  # [K, C]

  def lookup(self, indices: jax.Array) -> jax.Array:
    """Codebook vectors of `indices` [...] -> [..., C]."""
    return jnp.take(self.embedding[...], indices, axis=0)

  def __call__(self, z: jax.Array) -> QuantizerOutput:
    """z: [B, h, w, C] -> QuantizerOutput."""
    codebook = self.embedding[...]  # [K, C]
    indices = nearest_codes(z.reshape(-1, z.shape[-1]), codebook).reshape(z.shape[:-1])  # [B, h, w]
    z_q = self.lookup(indices)  # [B, h, w, C]
    commitment_loss = jnp.mean(jnp.square(jax.lax.stop_gradient(z_q) - z))
    codebook_loss = jnp.mean(jnp.square(z_q - jax.lax.stop_gradient(z)))
    perplexity, code_usage = code_statistics(indices, self.num_embeddings)
    return QuantizerOutput(
        quantized=z + jax.lax.stop_gradient(z_q - z),
        indices=indices,
        loss=commitment_loss + self.beta * codebook_loss,
        codebook_loss=codebook_loss,
        commitment_loss=commitment_loss,
        perplexity=perplexity,
        code_usage=code_usage,
    )
