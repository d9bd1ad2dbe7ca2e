"""Stride-1 convolutions whose filter gradient is cheaper on the CPU at small batch sizes.

XLA's CPU backend computes a convolution's filter gradient as a convolution whose "kernel" is the whole
image and whose contracted depth is the batch: at batch 1 Eigen gathers single-channel patches, and the
filter gradient of a 3x3 conv at [1, 256, 256, 128] takes 2-3x its forward pass. Cutting each image into
horizontal strips (each with the rows its taps reach beyond it repeated) turns the batch of 1 into a batch of
8 strips: the same sums, faster at the paper's widths (docs/performance.md). With a batch of 8 or more
(where strips measured no faster), or off the CPU, the gradient is XLA's own.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

Padding = tuple[tuple[int, int], tuple[int, int]]
MIN_DEPTH = 8  # strips * batch to aim for
MIN_ROWS = 8  # the shortest strip (a halo of kernel-1 rows is repeated per strip)


def _conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def num_strips(batch: int, out_height: int) -> int:
  """How many strips the filter gradient cuts each image into: enough for a depth of MIN_DEPTH, each strip
  at least MIN_ROWS output rows, dividing the height; 1 (XLA's own gradient) off the CPU."""
  if jax.default_backend() != "cpu":
    return 1
  strips = max(1, MIN_DEPTH // batch)
  while strips > 1 and (out_height % strips or out_height // strips < MIN_ROWS):
    strips //= 2
  return strips


def filter_gradient(
    x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...], padding: Padding
) -> jax.Array:
  """d loss / d kernel of `_conv(x, kernel, padding)` given dy = d loss / d output.
  x [B, H, W, Ci], dy [B, H', W', Co] -> [kh, kw, Ci, Co]."""
  b, out_h, out_w, co = dy.shape
  kh = kernel_shape[0]
  strips = num_strips(b, out_h)
  if strips == 1:
    return jax.vjp(lambda k: _conv(x, k, padding), jnp.zeros(kernel_shape, x.dtype))[1](dy)[0]
  rows = out_h // strips
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))  # [B, H'+kh-1, W+pads, Ci]
  # Strip s reads padded rows s*rows ... s*rows + rows + kh - 2.
  take = (jnp.arange(strips)[:, None] * rows + jnp.arange(rows + kh - 1)[None]).reshape(-1)
  xs = xp[:, take].reshape(
      b * strips, rows + kh - 1, xp.shape[2], x.shape[3]
  )  # [B*S, rows+kh-1, W', Ci]
  dys = dy.reshape(b * strips, rows, out_w, co)  # [B*S, rows, W', Co]
  # The sum over strips and positions as one convolution: batch = Ci, depth = B*S, "kernel" = the strip.
  return jax.lax.conv_general_dilated(
      xs, dys, (1, 1), "VALID", dimension_numbers=("CHWN", "IHWO", "HWNC")
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """A stride-1 convolution, NHWC x HWIO -> NHWC, padding ((top, bottom), (left, right))."""
  return _conv(x, kernel, padding)


def _conv2d_fwd(x, kernel, padding):
  return _conv(x, kernel, padding), (x, kernel)


def _conv2d_bwd(padding, residuals, dy):
  x, kernel = residuals
  dx = jax.vjp(lambda x: _conv(x, kernel, padding), x)[1](dy)[0]
  return dx, filter_gradient(x, dy, kernel.shape, padding)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nnx.Conv):
  """nnx.Conv (same parameters) for stride-1 convolutions with explicit padding, through `conv2d`."""

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Ci] -> [B, H', W', Co]
    x, kernel, bias = self.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
    padding = ((0, 0), (0, 0)) if self.padding == "VALID" else self.padding
    return conv2d(x, kernel, padding) + bias
