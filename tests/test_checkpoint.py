"""Checkpoints: a damaged latest checkpoint is moved aside and the run resumes from the one before."""

import gc
import logging

import grain
import jax
import numpy as np
import pytest

from dove_jax.training import checkpoint

# A read that fails leaves orbax's reads of the other arrays as coroutines never awaited, which Python
# reports when it collects them: `restore` collects them at once, while this filter applies.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def saved_run(directory, steps=(1, 2), keep=3):
  """Checkpoints of a small state at `steps`, the input iterator one element further at each; returns the
  states by step."""
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  ckpt = checkpoint.Checkpointer(directory, every_steps=1, keep=keep)
  states = {}
  for step in steps:
    next(iterator)
    # Random values: the array data file, not the metadata, is then the largest file of a checkpoint.
    states[step] = {"w": jax.random.normal(jax.random.key(step), (64, 64)), "step": np.int32(step)}
    ckpt.save(step, states[step], iterator, force=True)
  ckpt.close()
  return states


def restore(directory, shape=(64, 64), keep=3):
  """The restored state, the next element of the restored input iterator, and the checkpointer."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {
      "w": jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding),
      "step": jax.ShapeDtypeStruct((), np.int32, sharding=sharding),
  }
  iterator = iter(grain.MapDataset.range(100).to_iter_dataset())
  ckpt = checkpoint.Checkpointer(directory, every_steps=1, keep=keep)
  try:
    state = ckpt.restore(abstract, iterator)
  finally:
    gc.collect()
  return state, next(iterator), ckpt


def truncate(folder, name=None):
  """Cuts the file called `name` (default: the largest file) in `folder` to half its length."""
  files = [p for p in folder.rglob("*") if p.is_file() and name in (None, p.name)]
  damaged = max(files, key=lambda p: p.stat().st_size)
  damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])


def listing(directory):
  return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize(
    "damaged", [None, "_METADATA"]
)  # an array's data, the state's tree metadata
def test_a_damaged_latest_checkpoint_is_kept_aside_and_the_one_before_restores(
    tmp_path, caplog, damaged
):
  states = saved_run(tmp_path)
  truncate(tmp_path / "2", damaged)
  kept = sorted(p.relative_to(tmp_path / "2") for p in (tmp_path / "2").rglob("*"))
  with caplog.at_level(logging.WARNING):
    state, next_element, ckpt = restore(tmp_path)
  np.testing.assert_array_equal(state["w"], states[1]["w"])
  assert int(state["step"]) == 1
  assert next_element == 1  # the input iterator of step 1 too: one element consumed
  warnings = [
      r.getMessage()
      for r in caplog.records
      if r.levelno == logging.WARNING and "restore" in r.getMessage()
  ]
  assert len(warnings) == 1 and warnings[0].startswith("checkpoint 2 does not restore ("), warnings
  assert "resumed from step 1" in warnings[0] and "2.corrupt-1" in warnings[0]
  assert listing(tmp_path) == ["1", "2.corrupt-1"]
  assert (
      sorted(p.relative_to(tmp_path / "2.corrupt-1") for p in (tmp_path / "2.corrupt-1").rglob("*"))
      == kept
  )
  assert ckpt.latest_step() == 1

  # Later saves go on as usual, step 2 included; pruning (keep=2 here) never counts the kept one.
  ckpt.close()
  saved_run(tmp_path, steps=(2, 3), keep=2)
  assert listing(tmp_path) == ["2", "2.corrupt-1", "3"]
  state, next_element, ckpt = restore(tmp_path)
  assert int(state["step"]) == 3 and next_element == 2
  ckpt.close()


def test_a_second_damaged_checkpoint_at_the_same_step_is_kept_too(tmp_path):
  saved_run(tmp_path)
  truncate(tmp_path / "2")
  restore(tmp_path)[2].close()
  saved_run(tmp_path, steps=(2,))
  truncate(tmp_path / "2")
  state, _, ckpt = restore(tmp_path)
  ckpt.close()
  assert int(state["step"]) == 1
  assert listing(tmp_path) == ["1", "2.corrupt-1", "2.corrupt-2"]


def test_when_no_checkpoint_restores_it_fails_naming_each_and_moves_none(tmp_path):
  saved_run(tmp_path)
  truncate(tmp_path / "1")
  truncate(tmp_path / "2", "_METADATA")
  with pytest.raises(
      RuntimeError,
      match=r"no checkpoint in .* restores \(tried step 2: JSONDecodeError: .*; "
      r"step 1: ValueError: .*\); none was moved aside",
  ):
    restore(tmp_path)
  assert listing(tmp_path) == ["1", "2"]


def test_a_checkpoint_of_another_config_fails_naming_the_parameter_and_both_shapes(tmp_path):
  saved_run(tmp_path)
  with pytest.raises(
      ValueError, match=r"parameter w: checkpoint shape \(64, 64\) != model shape \(64, 32\)"
  ):
    restore(tmp_path, shape=(64, 32))
  assert listing(tmp_path) == ["1", "2"]
