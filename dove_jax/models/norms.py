"""GroupNorm and LayerNorm: Flax's modules (same parameters, same options), with PyTorch's two-pass variance
and float32 statistics, summed by `kernels.sum_over` (on the CPU, in a form XLA's CPU compiler fuses with
what it sums).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dove_jax.models import kernels


class GroupNorm(kernels.UsesKernels, nnx.GroupNorm):
  """`nnx.GroupNorm` over [B, ..., C] (statistics per image and group of channels), two-pass variance as
  torch's GroupNorm; float32 statistics whatever the input dtype."""

  def __call__(self, x: jax.Array, *, mask=None) -> jax.Array:
    if mask is not None or self.reduction_axes is not None or self.axis_name is not None:
      raise NotImplementedError("dove_jax GroupNorm: no mask, reduction_axes or axis_name")
    b, c = x.shape[0], x.shape[-1]
    per_group = c // self.num_groups
    flat = x.reshape(b, -1, c).astype(jnp.float32)  # [B, P, C]
    count = flat.shape[1] * per_group

    def group_mean(v):  # [B, P, C] -> [B, 1, C]: each channel's group mean
      means = (
          kernels.sum_over(v, 1, self.kernels).reshape(b, self.num_groups, per_group).sum(-1)
          / count
      )  # [B, G]
      return jnp.repeat(means, per_group, axis=1)[:, None]

    centered, inverse_std = _centered(flat, group_mean, self.epsilon)  # [B, P, C], [B, 1, C]
    # The scale joins the small [B, 1, C] factor: its gradient then sums one product over [B, P, C], not two.
    y = _affine(self, centered, inverse_std)
    return y.reshape(x.shape).astype(self.dtype or y.dtype)


class LayerNorm(kernels.UsesKernels, nnx.LayerNorm):
  """`nnx.LayerNorm` over the last axis, two-pass variance as torch's; float32 statistics."""

  def __call__(self, x: jax.Array, *, mask=None) -> jax.Array:
    if mask is not None or self.reduction_axes not in (-1, (-1,)) or self.axis_name is not None:
      raise NotImplementedError("dove_jax LayerNorm: the last axis only, no mask or axis_name")
    width = x.shape[-1]
    centered, inverse_std = _centered(
        x.astype(jnp.float32),
        lambda v: kernels.sum_over(v, -1, self.kernels)[..., None] / width,
        self.epsilon,
    )
    y = _affine(self, centered * inverse_std, 1.0)
    return y.astype(self.dtype or y.dtype)


def _centered(x: jax.Array, mean, epsilon: float) -> tuple[jax.Array, jax.Array]:
  """x - mean(x) and 1 / sqrt(mean((x - mean(x))^2) + epsilon): the two-pass variance torch computes."""
  centered = x - mean(x)
  return centered, jax.lax.rsqrt(mean(centered * centered) + epsilon)


def _affine(
    norm: nnx.GroupNorm | nnx.LayerNorm, x: jax.Array, factor: jax.Array | float
) -> jax.Array:
  """x * (factor * scale) + bias, scale and bias over the last axis, each where the norm has it."""
  if norm.scale is not None:
    factor = factor * norm.scale[...].astype(jnp.float32)
  y = x * factor
  if norm.bias is not None:
    y = y + norm.bias[...].astype(jnp.float32)
  return y
