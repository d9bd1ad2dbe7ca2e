"""dove_jax.models.kernels: the CPU kernels compute what plain XLA computes (values and gradients), and the
kernels are chosen once per model, by the backend or by the config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.dove import get_config
from dove_jax.models import kernels
from dove_jax.models.dove import DOVE
from test_dove import TINY


@pytest.fixture(autouse=True)
def exact_matmuls():
  """Both forms at full float32 precision (a GPU's default would round both to TF32, differently)."""
  with jax.default_matmul_precision("highest"):
    yield


def _close_gradients(f, args, argnums, probe_shape, atol):
  """Values and gradients of sum(f(*args, impl) * probe) agree between the CPU kernel and plain XLA."""
  probe = jax.random.normal(jax.random.key(9), probe_shape)
  results = [
      jax.value_and_grad(lambda *a: jnp.sum(f(*a, impl) * probe), argnums)(*args)
      for impl in ("cpu", "xla")
  ]
  for ours, plain in zip(*(jax.tree.leaves(r) for r in results)):
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=atol * float(jnp.max(jnp.abs(plain))))


@pytest.mark.parametrize(
    "batch, height, width, kernel, padding",
    [
        (1, 64, 24, 3, ((1, 1), (1, 1))),  # a VQ-GAN 3x3 conv: 8 strips of 8 rows
        (2, 40, 16, 2, ((1, 0), (0, 1))),  # an upsampling phase: 4 strips of 10 rows
        (1, 32, 8, 1, ((0, 0), (0, 0))),  # a 1x1 conv: no halo
        (8, 16, 16, 3, ((1, 1), (1, 1))),  # batch 8: XLA's own gradient
    ],
)
def test_strip_convolution_equals_xla_convolution(batch, height, width, kernel, padding):
  x = jax.random.normal(jax.random.key(0), (batch, height, width, 4))
  weights = jax.random.normal(jax.random.key(1), (kernel, kernel, 4, 6))
  out_shape = kernels.conv2d(x, weights, padding, "xla").shape
  _close_gradients(
      lambda x, w, impl: kernels.conv2d(x, w, padding, impl), (x, weights), (0, 1), out_shape, 1e-5
  )


def test_strips_deepen_small_batches_only():
  assert kernels.num_strips(1, 256) == 8
  assert kernels.num_strips(2, 40) == 4
  assert kernels.num_strips(1, 12) == 1  # strips would be shorter than 8 rows
  assert kernels.num_strips(1, 36) == 4  # 8 does not divide 36
  assert kernels.num_strips(8, 256) == 1


def test_phase_upsampling_equals_convolving_the_upsampled_image():
  x = jax.random.normal(jax.random.key(0), (2, 5, 7, 6))  # odd, non-square: every border phase
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 6, 4))
  bias = jax.random.normal(jax.random.key(2), (4,))
  assert kernels.upsample_conv3x3(x, kernel, bias, "cpu").shape == (2, 10, 14, 4)
  _close_gradients(kernels.upsample_conv3x3, (x, kernel, bias), (0, 1, 2), (2, 10, 14, 4), 1e-5)


@pytest.mark.parametrize("size", [7, 32, 33, 64, 900, 4096, 4099])
def test_fused_sum_sums(size):
  x = jax.random.normal(jax.random.key(0), (3, size, 5)) * 2 + 30
  for axis in (1, -1):
    expected = np.asarray(x, np.float64).sum(axis)
    for impl in ("cpu", "xla"):
      np.testing.assert_allclose(kernels.sum_over(x, axis, impl), expected, rtol=1e-6)


def _attention_inputs(length, mask_rows):
  q, k, v = (
      jax.random.normal(key, (2, length, 3, 8)) for key in jax.random.split(jax.random.key(0), 3)
  )
  mask = jnp.asarray(np.arange(length)[None] >= np.array([[0], [4]]))[
      :, None, None, :
  ]  # [B, 1, 1, L]: the second sequence left-padded by 4
  if mask_rows:  # a mask with a row per query: [B, 1, T, L]
    mask = mask & jax.random.bernoulli(jax.random.key(2), 0.8, (2, 1, length, length))
  return q, k, v, mask


def _sees_any(mask, causal: bool) -> jax.Array:
  """[B, T, 1, 1]: whether each query sees a key (mask [B, 1, T or 1, L])."""
  length = mask.shape[-1]
  seen = mask & (np.tril(np.ones((length, length), bool)) if causal else True)
  return jnp.any(seen, axis=-1)[:, 0, :, None, None]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("length,mask_rows", [(12, False), (130, False), (130, True)])
@pytest.mark.parametrize("impl", ["cpu", "xla"])
def test_attention_matches_jax_nn(impl, causal, length, mask_rows):
  """130 long and causal on the CPU: in query blocks (33, 33, 33, 31), each against the keys it can see."""
  q, k, v, mask = _attention_inputs(length, mask_rows)
  # A query that sees no key (the padded rows under causal attention) gets a finite, meaningless output.
  sees_any = _sees_any(mask, causal)

  def ours(q, k, v):
    return kernels.attention(q, k, v, mask, causal, impl)

  def theirs(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)

  np.testing.assert_allclose(
      jnp.where(sees_any, ours(q, k, v), 0), jnp.where(sees_any, theirs(q, k, v), 0), atol=1e-6
  )
  # Same gradients too (the CPU softmax's max shift carries none), and finite ones everywhere.
  probe = jnp.where(sees_any, jax.random.normal(jax.random.key(1), q.shape), 0)
  grads = [
      jax.grad(lambda *qkv: jnp.sum(attend(*qkv) * probe), (0, 1, 2))(q, k, v)
      for attend in (ours, theirs)
  ]
  for g_ours, g_theirs in zip(*grads):
    np.testing.assert_allclose(g_ours, g_theirs, atol=1e-5)
    assert np.isfinite(g_ours).all()
  no_key = jnp.zeros((1, 1, 1, length), bool)
  assert np.isfinite(kernels.attention(q, k, v, no_key, causal, impl)).all()


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("causal", [False, True])
def test_cudnn_attention_in_bfloat16_matches_xla(causal):
  """What the GPU check runs: cuDNN's fused attention (bf16) against XLA's, padded rows finite."""
  q, k, v, mask = (
      a.astype(jnp.bfloat16) if a.dtype == jnp.float32 else a for a in _attention_inputs(130, False)
  )
  sees_any = _sees_any(mask, causal)
  probe = jnp.where(sees_any, jax.random.normal(jax.random.key(1), q.shape), 0).astype(q.dtype)
  results = [
      jax.value_and_grad(
          lambda *qkv: jnp.sum(
              (kernels.attention(*qkv, mask, causal, impl) * probe).astype(jnp.float32)
          ),
          (0, 1, 2),
      )(q, k, v)
      for impl in ("cudnn", "xla")
  ]
  fused = kernels.attention(q, k, v, mask, causal, "cudnn").astype(jnp.float32)
  plain = kernels.attention(q, k, v, mask, causal, "xla").astype(jnp.float32)
  assert np.isfinite(fused).all()
  np.testing.assert_allclose(
      jnp.where(sees_any, fused, 0), jnp.where(sees_any, plain, 0), atol=3e-2
  )
  for g_fused, g_plain in zip(*(jax.tree.leaves(r) for r in results)):
    g_fused, g_plain = (np.asarray(g, np.float32) for g in (g_fused, g_plain))
    assert np.isfinite(g_fused).all()
    np.testing.assert_allclose(g_fused, g_plain, atol=5e-2 * np.abs(g_plain).max())


def test_auto_is_chosen_by_the_backend_and_a_wrong_name_is_refused():
  # On a GPU: cuDNN (the GPU machine's is an NVIDIA one).
  auto = {"cpu": "cpu", "gpu": "cudnn", "tpu": "xla"}[jax.default_backend()]
  assert kernels.current() == kernels.resolve("auto") == auto
  with kernels.use("xla"):
    assert kernels.current() == "xla"
    with kernels.use("cpu"):
      assert kernels.current() == "cpu"
    assert kernels.current() == "xla"
  assert kernels.current() == auto
  config = get_config("tiny")
  config.model.kernels = "gpu"
  with pytest.raises(ValueError, match=r"kernels='gpu' \(config model.kernels\): expected one of"):
    DOVE(**config.model, rngs=nnx.Rngs(0))


def _modules_kernels(model) -> set[str]:
  return {m.kernels for _, m in nnx.iter_graph(model) if hasattr(m, "kernels")}


def test_a_model_keeps_its_kernels_and_both_compute_the_same():
  """A whole small DOVE built with "xla" (what a GPU runs) against "cpu" (the same weights): the same loss
  and gradients; each module keeps the kernels it was built with, so one jitted function compiles each.
  """
  models = {impl: DOVE(**TINY, kernels=impl, rngs=nnx.Rngs(0)) for impl in ("cpu", "xla")}
  assert {impl: _modules_kernels(m) for impl, m in models.items()} == {
      "cpu": {"cpu"},
      "xla": {"xla"},
  }
  assert "kernels" not in models["xla"].arguments  # a model folder loads with the loading machine's
  images = jax.random.uniform(jax.random.key(1), (2, 32, 32, 3), minval=-1, maxval=1)

  @nnx.jit
  def loss_and_grads(model):
    def loss(model):
      tokens = model.encode(images, token_budget=jnp.array([5, 16]))
      return jnp.mean(jnp.square(model.decode(tokens) - images)) + jnp.mean(tokens.eos_prob)

    return nnx.value_and_grad(loss)(model)

  (loss_cpu, grads_cpu), (loss_xla, grads_xla) = (loss_and_grads(models[i]) for i in ("cpu", "xla"))
  np.testing.assert_allclose(loss_xla, loss_cpu, rtol=1e-5)
  for g_xla, g_cpu in zip(jax.tree.leaves(grads_xla), jax.tree.leaves(grads_cpu)):
    np.testing.assert_allclose(g_xla, g_cpu, atol=1e-4 * float(jnp.max(jnp.abs(g_cpu))) + 1e-8)
