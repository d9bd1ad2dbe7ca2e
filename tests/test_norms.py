"""dove_jax.models.norms: the same values and gradients as Flax's GroupNorm / LayerNorm (two-pass variance)
and torch's, and statistics that XLA fuses with what they sum."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from dove_jax import xla
from dove_jax.models import kernels
from dove_jax.models.norms import GroupNorm, LayerNorm


def _inputs(shape, seed=0):
  # A large mean over a small spread: where a one-pass variance would lose digits.
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 2 + 30)


def _randomize(norm, seed=1):
  rng = np.random.default_rng(seed)
  norm.scale[...] = jnp.asarray(rng.normal(1, 0.3, norm.scale.shape).astype(np.float32))
  norm.bias[...] = jnp.asarray(rng.normal(0, 0.3, norm.bias.shape).astype(np.float32))
  return norm


def _assert_same_gradients(ours, flax, x):
  """Gradients of a loss through `ours` and through `flax` (two norms with the same parameters) agree."""

  def loss(model, x):
    return jnp.sum(jnp.sin(model(x)) * jnp.linspace(0, 1, x.shape[-1]))

  (ours_grads, ours_dx), (flax_grads, flax_dx) = (
      nnx.grad(loss, argnums=(0, 1))(m, x) for m in (ours, flax)
  )
  np.testing.assert_allclose(ours_dx, flax_dx, atol=1e-5)
  for name in (
      "scale",
      "bias",
  ):  # sums over the whole batch: float32 rounding of the order they add in
    expected = flax_grads[name][...]
    np.testing.assert_allclose(
        ours_grads[name][...], expected, atol=1e-5 * float(jnp.max(jnp.abs(expected)))
    )


@pytest.mark.parametrize(
    "shape,groups",
    [((2, 64, 64, 16), 8), ((2, 7, 7, 64), 32), ((3, 30, 30, 12), 3), ((2, 10, 6), 2)],
)
@pytest.mark.parametrize("impl", ["cpu", "xla"])
def test_group_norm_matches_flax_and_torch(shape, groups, impl):
  channels = shape[-1]
  with kernels.use(impl):
    ours = _randomize(GroupNorm(channels, num_groups=groups, epsilon=1e-6, rngs=nnx.Rngs(0)))
  flax = _randomize(
      nnx.GroupNorm(
          channels, num_groups=groups, epsilon=1e-6, use_fast_variance=False, rngs=nnx.Rngs(0)
      )
  )
  x = _inputs(shape)
  np.testing.assert_allclose(ours(x), flax(x), atol=2e-5)
  theirs = torch.nn.GroupNorm(groups, channels, eps=1e-6)
  theirs.weight.data, theirs.bias.data = (
      torch.from_numpy(np.array(v)) for v in (ours.scale[...], ours.bias[...])
  )
  channels_first = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())
  expected = np.moveaxis(theirs(channels_first).detach().numpy(), 1, -1)
  np.testing.assert_allclose(ours(x), expected, atol=2e-5)
  _assert_same_gradients(ours, flax, x)


@pytest.mark.parametrize("shape", [(2, 40, 128), (2, 3, 48)])
@pytest.mark.parametrize("impl", ["cpu", "xla"])
def test_layer_norm_matches_flax(shape, impl):
  width = shape[-1]
  with kernels.use(impl):
    ours = _randomize(LayerNorm(width, epsilon=1e-5, dtype=jnp.float32, rngs=nnx.Rngs(0)))
  flax = _randomize(
      nnx.LayerNorm(
          width, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False, rngs=nnx.Rngs(0)
      )
  )
  x = _inputs(shape)
  np.testing.assert_allclose(ours(x), flax(x), atol=2e-5)
  assert ours(x.astype(jnp.bfloat16)).dtype == jnp.float32  # float32 whatever the input
  _assert_same_gradients(ours, flax, x)


def _full_size_buffers(norm, x) -> int:
  """How many arrays of x's size the forward pass compiled as the library compiles writes (the output is one)."""
  graphdef, state = nnx.split(norm)
  hlo = xla.jit(lambda s, x: nnx.merge(graphdef, s)(x)).lower(state, x).compile().as_text()
  outputs = re.findall(
      r"= f32\[([\d,]+)\]\S* fusion\(", hlo[hlo.index("ENTRY") :]
  )  # each fusion's shape
  return sum(np.prod([int(d) for d in dims.split(",")]) == x.size for dims in outputs)


def test_group_norm_statistics_fuse_with_their_inputs():
  """The point of the module: its statistics read x without writing the centred values or their squares
  first (Flax's GroupNorm writes them, for XLA's reduce-windows to read)."""
  x = _inputs((8, 64, 64, 16))
  with kernels.use("cpu"):
    assert _full_size_buffers(GroupNorm(16, num_groups=8, rngs=nnx.Rngs(0)), x) == 1
  with kernels.use("xla"):  # plain sums, as on a GPU
    assert _full_size_buffers(GroupNorm(16, num_groups=8, rngs=nnx.Rngs(0)), x) > 1
  flax = nnx.GroupNorm(16, num_groups=8, use_fast_variance=False, rngs=nnx.Rngs(0))
  assert _full_size_buffers(flax, x) > 1


def test_unsupported_options_are_refused():
  with pytest.raises(NotImplementedError, match="reduction_axes"):
    GroupNorm(8, num_groups=2, reduction_axes=(1, 2), rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 8)))
  with pytest.raises(NotImplementedError, match="last axis"):
    LayerNorm(4, reduction_axes=(1, 2), feature_axes=(1, 2), rngs=nnx.Rngs(0))(jnp.ones((1, 3, 4)))
