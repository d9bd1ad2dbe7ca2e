"""Stride-1 convolutions with the strip-wise filter gradient (dove_jax.models.conv)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dove_jax.models import conv


@pytest.mark.parametrize(
    "batch, height, width, kernel, padding",
    [
        (1, 64, 24, 3, ((1, 1), (1, 1))),  # a VQ-GAN 3x3 conv: 8 strips of 8 rows
        (2, 40, 16, 2, ((1, 0), (0, 1))),  # an upsampling phase: 4 strips of 10 rows
        (1, 32, 8, 1, ((0, 0), (0, 0))),  # a 1x1 conv: no halo
        (8, 16, 16, 3, ((1, 1), (1, 1))),  # batch 8: XLA's own gradient
    ],
)
def test_gradients_equal_xla_convolution(batch, height, width, kernel, padding):
  x = jax.random.normal(jax.random.key(0), (batch, height, width, 4))
  weights = jax.random.normal(jax.random.key(1), (kernel, kernel, 4, 6))
  ours = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv.conv2d(x, w, padding))), (0, 1))(x, weights)
  plain = jax.grad(lambda x, w: jnp.sum(jnp.sin(conv._conv(x, w, padding))), (0, 1))(x, weights)
  for a, b in zip(ours, plain):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_strips_deepen_small_batches_only():
  assert conv.num_strips(1, 256) == 8
  assert conv.num_strips(2, 40) == 4
  assert conv.num_strips(1, 12) == 1  # strips would be shorter than 8 rows
  assert conv.num_strips(1, 36) == 4  # 8 does not divide 36
  assert conv.num_strips(8, 256) == 1


def test_conv_module_keeps_nnx_conv_parameters_and_values():
  from flax import nnx

  ours = conv.Conv(4, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
  theirs = nnx.Conv(4, 6, (3, 3), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
  assert jax.tree.map(jnp.shape, nnx.state(ours)) == jax.tree.map(jnp.shape, nnx.state(theirs))
  x = jax.random.normal(jax.random.key(2), (1, 8, 8, 4))
  np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
