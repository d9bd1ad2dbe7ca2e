"""EOS masking: the length is the first firing slot, the mask a prefix, budgets exact, shapes static."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from dove_jax.models.eos import apply_mask, eos_mask

THRESHOLD = 0.5
probs = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=24),
    elements=st.floats(0.0, 1.0, width=32),
)


def reference_length(p: np.ndarray) -> int:
  """The first 1-based slot whose probability exceeds the threshold, or n: a plain loop."""
  for i, value in enumerate(p):
    if value > THRESHOLD:
      return i + 1
  return len(p)


@settings(max_examples=50, deadline=None)
@given(probs)
def test_length_is_first_firing_slot_and_mask_is_prefix(p):
  mask, lengths = jax.device_get(eos_mask(jnp.asarray(p), threshold=THRESHOLD))
  expected = np.array([reference_length(row) for row in p])
  np.testing.assert_array_equal(lengths, expected)
  np.testing.assert_array_equal(mask.sum(1), expected)
  assert np.all(mask[:, :-1] >= mask[:, 1:]), "mask is not a prefix"
  assert mask[:, 0].all(), "every image keeps at least its first slot"


@settings(max_examples=30, deadline=None)
@given(probs, st.data())
def test_budget_forces_exactly_k(p, data):
  b, n = p.shape
  budget = np.array(data.draw(st.lists(st.integers(-2, n + 3), min_size=b, max_size=b)), np.int32)
  mask, lengths = jax.device_get(eos_mask(jnp.asarray(p), jnp.asarray(budget), threshold=THRESHOLD))
  predicted = np.array([reference_length(row) for row in p])
  expected = np.where(budget > 0, np.minimum(budget, n), predicted)  # <= 0 keeps the prediction
  np.testing.assert_array_equal(lengths, expected)
  np.testing.assert_array_equal(mask.sum(1), expected)


@settings(max_examples=30, deadline=None)
@given(probs, st.data())
def test_dropped_slots_are_exactly_zero_and_kept_ones_unchanged(p, data):
  b, n = p.shape
  tokens = data.draw(hnp.arrays(np.float32, (b, n, 3), elements=st.floats(-1e6, 1e6, width=32)))
  mask, _ = eos_mask(jnp.asarray(p), threshold=THRESHOLD)
  tokens_nan = np.where(
      np.asarray(mask)[..., None], tokens, np.nan
  )  # dropped slots may hold anything
  out = np.asarray(apply_mask(jnp.asarray(tokens_nan), mask))
  m = np.asarray(mask)
  np.testing.assert_array_equal(out[~m], 0.0)
  assert not np.signbit(out[~m]).any()
  np.testing.assert_array_equal(out[m], tokens[m])


def test_mixed_lengths_in_one_batch_under_jit_and_vmap():
  p = np.zeros((3, 8), np.float32)
  p[0, 2] = 0.9  # fires at slot 3
  p[1, 6] = 0.7  # fires at slot 7; nothing fires in image 2 -> 8
  p[1, 7] = 0.99
  expected = [3, 7, 8]
  _, lengths = jax.jit(eos_mask)(jnp.asarray(p))
  np.testing.assert_array_equal(lengths, expected)
  per_image = jax.vmap(lambda row: eos_mask(row[None])[1][0])(jnp.asarray(p))
  np.testing.assert_array_equal(per_image, expected)
  _, forced = jax.jit(eos_mask)(jnp.asarray(p), jnp.asarray([5, 0, 1]))
  np.testing.assert_array_equal(forced, [5, 7, 1])


def test_threshold_is_strict():
  _, lengths = eos_mask(jnp.asarray([[0.5, 0.5001, 0.1]]), threshold=0.5)
  assert int(lengths[0]) == 2


def test_gradient_flows_to_kept_tokens_only():
  mask, _ = eos_mask(jnp.asarray([[0.1, 0.9, 0.1]]))
  grad = jax.grad(lambda t: apply_mask(t, mask).sum())(jnp.ones((1, 3, 2)))
  np.testing.assert_array_equal(grad[0, :, 0], [1.0, 1.0, 0.0])


def test_different_lengths_and_budgets_do_not_recompile(count_compiles):
  step = jax.jit(lambda p, k, t: apply_mask(t, eos_mask(p, k)[0]))
  rng = np.random.default_rng(0)
  tokens = jnp.ones((4, 16, 8))
  step(
      jnp.asarray(rng.random((4, 16), np.float32)), jnp.zeros(4, jnp.int32), tokens
  )  # compile once
  inputs = [
      (
          jnp.asarray(rng.random((4, 16), np.float32) ** (i + 1)),  # different lengths each call
          jnp.asarray(rng.integers(-1, 17, 4), jnp.int32),
      )
      for i in range(5)
  ]
  lengths = {tuple(np.asarray(jax.jit(eos_mask)(p, k)[1])) for p, k in inputs}
  assert len(lengths) > 1, "the inputs should give different lengths"
  with count_compiles() as c:
    for p, budget in inputs:
      out = step(p, budget, tokens)
  assert c.count == 0, f"{c.count} recompilations for new lengths/budgets"
  assert out.shape == (4, 16, 8)


@pytest.mark.parametrize("budget", [1, 4, 16])
def test_scalar_budget_applies_to_every_image(budget):
  mask, lengths = eos_mask(jnp.full((3, 16), 0.9), budget)
  np.testing.assert_array_equal(lengths, [budget] * 3)
