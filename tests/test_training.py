"""Training: sharding equivalence, kill-and-resume, config errors, and the command line end to end."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_checkpoint import truncate

ROOT = Path(__file__).resolve().parents[1]


def python(code_or_args, env=None, timeout=900):
  args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
  return subprocess.run(
      [sys.executable, *args],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
      env={**os.environ, **(env or {})},
  )


def test_config_typo_fails_before_any_compute(tmp_path):
  start = time.perf_counter()
  result = python(
      [
          "train.py",
          "--config",
          "configs/dove.py:tiny",
          f"--workdir={tmp_path / 'run'}",
          "--config.optim.lerning_rate=1",
      ]
  )
  assert result.returncode != 0
  assert "lerning_rate" in result.stderr and 'Did you mean "learning_rate"' in result.stderr
  assert not (tmp_path / "run").exists()
  hinj = [
      "train.py",
      "--config",
      "configs/dove.py:tiny",
      f"--workdir={tmp_path / 'run'}",
      "--config.loss.gan_kind=hinj",
  ]
  result = python(hinj)
  assert result.returncode != 0
  message = "config.loss.gan_kind = 'hinj'; expected one of ('hinge', 'non_saturating')"
  assert (
      f"train.py: {message}" in result.stderr.splitlines() and "Traceback" not in result.stderr
  ), result.stderr
  assert not (tmp_path / "run" / "checkpoints").exists()
  verbose = python(
      [*hinj, "--verbosity=0"]
  )  # a ValueError may be a bug: --verbosity shows where it came from
  assert verbose.returncode != 0 and "Traceback" in verbose.stderr and message in verbose.stderr
  assert time.perf_counter() - start < 120


INIT_MESSAGE = (
    "configs/dove.py trains from pretrained weights and config.init names none: set "
    "--config.init.vqgan=... and --config.init.pythia=... (or --config.init.weights / "
    "--config.init.checkpoint), or --config.init.from_scratch=True to train from random weights"
)


def test_the_paper_config_without_weights_fails_before_any_compute(tmp_path):
  from configs import dove
  from dove_jax.training.loop import train_and_evaluate

  with pytest.raises(ValueError, match=re.escape(INIT_MESSAGE)):
    train_and_evaluate(dove.get_config(""), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_named_weights_or_from_scratch_pass_the_init_check():
  from configs import dove, qdove
  from dove_jax.training.loop import check_config

  with pytest.raises(ValueError, match=re.escape(INIT_MESSAGE)):
    check_config(dove.get_config(""))
  for field, value in [
      ("from_scratch", True),
      ("vqgan", "amused-vqvae"),
      ("pythia", "pythia-70m"),
      ("weights", "dove.safetensors"),
      ("checkpoint", "runs/dove"),
  ]:
    config = dove.get_config("")
    config.init[field] = value
    check_config(config)
  check_config(dove.get_config("tiny"))  # the tiny presets train from random weights on purpose
  check_config(qdove.get_config("tiny"))


def test_a_wrong_kernels_name_fails_before_any_compute():
  from configs import dove
  from dove_jax.training.loop import check_config

  config = dove.get_config("tiny")
  config.model.kernels = "gpu"
  message = (
      "config.model.kernels = 'gpu'; expected one of ('auto', 'cpu', 'xla', 'cudnn', 'portable')"
  )
  with pytest.raises(ValueError, match=re.escape(message)):
    check_config(config)


@pytest.fixture(scope="module")
def data_dir(builtin_data_dir):
  return builtin_data_dir


def train_command(workdir, data_dir, steps, *extra):
  return [
      "train.py",
      "--config",
      "configs/dove.py:tiny",
      f"--workdir={workdir}",
      f"--config.train.num_steps={steps}",
      f"--config.data.data_dir={data_dir}",
      "--config.data.global_batch_size=8",
      "--config.train.eval_batches=1",
      *extra,
  ]


def wait_for_checkpoint(workdir: Path, step: int, process: subprocess.Popen, timeout: float = 600):
  """Blocks until a finished checkpoint of at least `step` exists (Orbax renames a finished save into place)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    done = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
    if done and max(done) >= step:
      return max(done)
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(0.05)
  raise TimeoutError(f"no checkpoint {step} in {workdir}")


def final_params(workdir: Path, step: int):
  import jax
  from dove_jax.weights import restore_on_one_device

  restored = restore_on_one_device(workdir / "checkpoints" / str(step) / "state")
  return jax.tree.leaves(restored["params"]), jax.tree.leaves(restored)


# loop.py's log line for the first step of a run; a resumed run loads the train step compiled before.
LOADED_FROM_CACHE = (
    r"train step compiled in [\d.]+ s \([1-9]\d* of \d+ programs from the compilation cache\)"
)


def test_interrupted_run_resumes_to_the_same_parameters(tmp_path, data_dir):
  """12 uninterrupted steps == SIGTERM (clean save and exit), resume (loading the compiled train step from
  the compilation cache: here the tests' shared one), SIGKILL mid-run, damage the latest checkpoint, resume.
  """
  import numpy as np

  fast = (
      "--config.train.checkpoint_every=1",
      "--config.train.log_every=1",
      "--config.loss.lpips_weight=0",
  )
  straight = python(train_command(tmp_path / "a", data_dir, 12, *fast))
  assert straight.returncode == 0, straight.stderr[-3000:]

  command = [sys.executable, *train_command(tmp_path / "b", data_dir, 12, *fast)]
  first = subprocess.Popen(
      command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  wait_for_checkpoint(tmp_path / "b", 2, first)
  first.send_signal(signal.SIGTERM)
  _, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert "SIGTERM: saving a checkpoint and stopping" in err
  stopped_at = max(
      int(p.name) for p in (tmp_path / "b" / "checkpoints").glob("*") if p.name.isdigit()
  )
  assert stopped_at < 12

  second = subprocess.Popen(
      command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )
  killed_after = wait_for_checkpoint(tmp_path / "b", stopped_at + 2, second)
  second.kill()  # SIGKILL: no handler runs; whatever was mid-write is discarded
  _, err = second.communicate(timeout=60)
  assert f"resuming from step {stopped_at}" in err
  assert re.search(LOADED_FROM_CACHE, err), "the resumed run compiled its train step again"
  assert killed_after < 12, "the kill came too late to test anything"

  # The latest checkpoint damaged afterwards: the re-run keeps it aside and resumes from the one before,
  # parameters and input position alike, so it still ends on the same parameters.
  checkpoints = tmp_path / "b" / "checkpoints"
  latest = max(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  truncate(checkpoints / str(latest))
  third = python(train_command(tmp_path / "b", data_dir, 12, *fast))
  assert third.returncode == 0, third.stderr[-3000:]
  assert re.search(
      rf"checkpoint {latest} does not restore \(.+\): resumed from step {latest - 1}", third.stderr
  )
  assert (
      f"resuming from step {latest - 1}" in third.stderr
  )  # the step restored, not the damaged one
  assert (checkpoints / f"{latest}.corrupt-1").is_dir()
  assert re.search(LOADED_FROM_CACHE, third.stderr)
  params_a, everything_a = final_params(tmp_path / "a", 12)
  params_b, everything_b = final_params(tmp_path / "b", 12)
  assert len(everything_a) == len(everything_b)
  for a, b in zip(
      everything_a, everything_b
  ):  # parameters, both optimizers' moments, threshold buffer, rng
    np.testing.assert_array_equal(a, b)
  assert any(np.abs(a).max() > 0 for a in params_a)


def test_eos_term_is_a_mean_over_the_images_at_their_own_length():
  """Forcing a length on some images leaves lambda_eos's weight on the others as it was."""
  import jax.numpy as jnp
  import numpy as np
  from dove_jax.training.step import batch_loss

  def loss(objective, l_eos, valid, own):
    return float(
        batch_loss(*map(jnp.array, (objective, l_eos, valid, own)), rec_weight=2.0, lambda_eos=0.1)
    )

  own_only = loss([1.0, 3.0], [-0.5, -0.1], [1.0, 1.0], [1.0, 1.0])
  # Images 1 and 3 forced (their L_eos is not applied), image 4 invalid (a corrupt file).
  half_forced = loss(
      [1.0, 5.0, 3.0, 7.0, 9.0],
      [-0.5, 9.0, -0.1, 9.0, 9.0],
      [1.0, 1.0, 1.0, 1.0, 0.0],
      [1.0, 0.0, 1.0, 0.0, 0.0],
  )
  np.testing.assert_allclose(own_only, 2.0 * 2.0 + 0.1 * -0.3, rtol=1e-6)
  np.testing.assert_allclose(half_forced, 2.0 * 4.0 + 0.1 * -0.3, rtol=1e-6)  # the same EOS term
  all_forced = loss([1.0, 3.0], [9.0, 9.0], [1.0, 1.0], [0.0, 0.0])
  np.testing.assert_allclose(all_forced, 2.0 * 2.0, rtol=1e-6)


def test_a_batch_trained_only_at_forced_lengths_records_no_threshold():
  """random_length_fraction = 1: no image is at its own length, so the train step's update of the threshold
  buffer records nothing; at 0 every valid image counts."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from dove_jax import losses
  from dove_jax.training.step import own_length_weights, sample_budgets

  valid = jnp.array([1.0, 1.0, 1.0, 0.0])
  rec = jnp.array([0.5, 1.5, 2.5, 100.0])
  buffer = losses.threshold_buffer(8)
  forced = own_length_weights(sample_budgets(jax.random.key(0), 4, 16, 1.0), valid)
  np.testing.assert_array_equal(forced, 0)
  assert losses.threshold_update(buffer, rec, forced)["count"] == 0
  own = own_length_weights(sample_budgets(jax.random.key(0), 4, 16, 0.0), valid)
  np.testing.assert_array_equal(own, valid)
  recorded = losses.threshold_update(buffer, rec, own)
  assert recorded["count"] == 1 and recorded["values"][0] == 1.5


@pytest.mark.parametrize("power", [1.0, 2.0])
def test_random_lengths_follow_their_power_law(power):
  """Forced lengths lie in 1..n with P(length <= k) = (k / n) ** power; the rest are 0 (predicted)."""
  import jax
  import numpy as np
  from dove_jax.training.step import sample_budgets

  n = 16
  budgets = np.asarray(sample_budgets(jax.random.key(1), 40_000, n, 0.5, power))
  forced = budgets[budgets > 0]
  assert abs(forced.size / budgets.size - 0.5) < 0.01 and forced.min() == 1 and forced.max() == n
  cdf = np.array([np.mean(forced <= k) for k in range(1, n + 1)])
  np.testing.assert_allclose(cdf, (np.arange(1, n + 1) / n) ** power, atol=0.01)


def test_optimizer_groups_frozen_sgd_and_adamw():
  """Frozen parts do not move; the SGD part moves in proportion to its (tiny) gradient; AdamW parts move by
  about the learning rate whatever the gradient's scale."""
  import jax
  import numpy as np
  from flax import nnx
  from dove_jax.models.dove import DOVE
  from dove_jax.tensor_io import param_path
  from dove_jax.training.state import optimizer
  from test_dove import TINY

  _, params = nnx.split(DOVE(**TINY, rngs=nnx.Rngs(0)))
  tx = optimizer(
      1e-3,
      b1=0.9,
      b2=0.99,
      weight_decay=0.0,
      grad_clip=1e9,
      frozen=("vqgan",),
      sgd={"generator/eos_head": 0.5},
      params=params,
  )
  grads = jax.tree.map(lambda p: np.full(p.shape, 1e-6, np.float32), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  moved = {
      param_path(path): float(np.abs(u).max())
      for path, u in jax.tree_util.tree_flatten_with_path(updates)[0]
  }
  assert all(v == 0 for k, v in moved.items() if k.startswith("vqgan/"))
  np.testing.assert_allclose(moved["generator/eos_head/bias"], 0.5e-6, rtol=1e-5)
  assert 5e-4 < moved["generator/transformer/layers/0/qkv/kernel"] < 2e-3


def test_a_non_finite_loss_stops_naming_the_step_and_the_term():
  import numpy as np
  from dove_jax.training.loop import check_finite

  check_finite(
      {"loss": np.float32(1.0), "eos_threshold": np.float32(-np.inf)}, 7, 5
  )  # -inf threshold is fine
  with pytest.raises(
      FloatingPointError,
      match=r"step 12: loss term 'lpips' is nan; .* last good checkpoint is step 10",
  ):
    check_finite({"loss": np.float32(1.0), "lpips": np.float32(np.nan)}, 12, 10)
