"""Checkpoints: an Orbax CheckpointManager holding the whole train state and the input iterator's position.

Saves are asynchronous (training goes on while the arrays are written) and atomic (a run killed mid-save
leaves the previous checkpoint as the latest), so re-running the same command resumes where it stopped.
A checkpoint damaged afterwards (a truncated or garbled file) is moved aside, and the run resumes from the
newest one that restores.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from dove_jax.tensor_io import param_path


class Checkpointer:

  def __init__(self, directory: str | Path, *, every_steps: int, keep: int):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps, enable_async_checkpointing=True
    )
    self.directory = Path(directory).absolute()
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); the iterator's state is taken now, synchronously."""
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
        ),
        force=force,
    )

  def restore(self, abstract_state, data_iterator):
    """The state of the newest checkpoint that restores, laid out as `abstract_state`'s shardings; moves
    `data_iterator` to where that same step left it.

    A newer checkpoint that does not restore is renamed `<step>.corrupt-<n>` (kept, out of the manager's
    sight and of `keep` pruning), with one warning line naming it and why. Nothing is renamed unless an
    older one restores: if none does, this raises listing every step and its error, and a re-run fails the
    same way instead of silently starting over. A checkpoint of another config raises naming every
    parameter whose shape differs.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        stored = shapes_by_path(
            ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
        )
      except (
          Exception
      ) as error:  # the tree's metadata is unreadable: whatever orbax raises on a damaged file
        failed.append((step, reason(error)))
        continue
      check_fits(stored, abstract_state, self.directory / str(step))
      try:
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                data=grain.checkpoint.CheckpointRestore(data_iterator),
            ),
        )
      except Exception as error:  # an array or the iterator's state is unreadable
        failed.append((step, reason(error)))
        continue
      self._set_aside(failed, step)
      return restored.state
    tried = "; ".join(f"step {step}: {why}" for step, why in failed)
    raise RuntimeError(
        f"no checkpoint in {self.directory} restores (tried {tried}); none was moved aside"
    )

  def _set_aside(self, failed: list[tuple[int, str]], restored_step: int) -> None:
    for step, why in failed:
      kept = next(
          path
          for n in itertools.count(1)
          if not (path := self.directory / f"{step}.corrupt-{n}").exists()
      )
      if jax.process_index() == 0:
        (self.directory / str(step)).rename(kept)
      logging.warning(
          "checkpoint %d does not restore (%s): resumed from step %d; the bad one is kept as %s",
          step,
          why,
          restored_step,
          kept,
      )
    if failed:
      if jax.process_count() > 1:  # every process reloads once process 0 has renamed
        multihost_utils.sync_global_devices("checkpoints set aside")
      self.manager.reload()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def shapes_by_path(tree) -> dict[str, tuple[int, ...]]:
  return {
      param_path(path): tuple(leaf.shape)
      for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def check_fits(stored: dict[str, tuple[int, ...]], abstract_state, origin: Path) -> None:
  """A checkpoint of another config (`stored`: its shapes by path) fails here, naming what differs, rather
  than being taken for a damaged one."""
  # The tree as orbax writes it (tuples as lists, dataclasses as dicts), so the paths are the stored ones.
  wanted = shapes_by_path(ocp.tree.serialize_tree(abstract_state, keep_empty_nodes=True))
  problems = [
      f"parameter {name}: checkpoint shape {stored[name]} != model shape {wanted[name]}"
      for name in sorted(stored.keys() & wanted.keys())
      if stored[name] != wanted[name]
  ]
  problems += [
      f"parameter {name} is not in the checkpoint" for name in sorted(wanted.keys() - stored.keys())
  ]
  problems += [
      f"checkpoint tensor {name} is not in the train state"
      for name in sorted(stored.keys() - wanted.keys())
  ]
  if problems:
    raise ValueError(
        f"checkpoint {origin} does not fit the train state:\n  " + "\n  ".join(problems)
    )


def reason(error: BaseException) -> str:
  """The innermost cause's type and first line: orbax wraps TensorStore's error, which names the file and
  the bytes, in a bare Exception."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0] if lines else ''}"


def abstract_like(state, shardings):
  """ShapeDtypeStructs with the target shardings: restore places every array directly where it belongs."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
  )
