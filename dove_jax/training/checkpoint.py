"""Checkpoints: an Orbax CheckpointManager holding the whole train state and the input iterator's position.

Saves are asynchronous (training goes on while the arrays are written) and atomic (a run killed mid-save
leaves the previous checkpoint as the latest), so re-running the same command resumes where it stopped.
"""
from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:

  def __init__(self, directory: str | Path, *, every_steps: int, keep: int):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=every_steps,
                                           enable_async_checkpointing=True)
    self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); the iterator's state is taken now, synchronously."""
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)), force=force)

  def restore(self, abstract_state, data_iterator, step: int | None = None):
    """The state at `step` (default: the latest), laid out as `abstract_state`'s shardings; moves
    `data_iterator` to where that step left it."""
    step = self.manager.latest_step() if step is None else step
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return restored.state

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state, shardings):
  """ShapeDtypeStructs with the target shardings: restore places every array directly where it belongs."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)

