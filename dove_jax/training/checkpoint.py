"""Checkpoints: an Orbax CheckpointManager holding the whole train state and the input iterator's position.

Saves are asynchronous (training goes on while the arrays are written) and atomic (a run killed mid-save
leaves the previous checkpoint as the latest), so re-running the same command resumes where it stopped.
"""
from __future__ import annotations

from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp
from flax import nnx

from dove_jax.convert.common import ConversionReport, Source, fill_by_path


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


def checkpoint_folder(path: str | Path) -> Path:
  """A run's workdir (holding checkpoints/) or its checkpoints/ folder itself -> the checkpoints folder."""
  directory = Path(path).expanduser().absolute()
  return directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory


def read_checkpoint_params(directory: str | Path, step: int | None = None,
                           item: str = "params") -> tuple[int, Source]:
  """The model parameters (`item` of the train state) of checkpoint `step` (default: the latest) in
  `directory` (a run's workdir or its checkpoints/ folder), keyed by parameter path. Returns the step and
  the tensors as a `Source`."""
  from dove_jax.training.state import param_path
  directory = checkpoint_folder(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint folder {directory}")
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps or (step is not None and step not in steps):
    wanted = "any checkpoint" if step is None else f"checkpoint {step}"
    raise FileNotFoundError(f"{wanted} not found in {directory} (steps there: {steps})")
  step = steps[-1] if step is None else step
  restored = ocp.StandardCheckpointer().restore(directory / str(step) / "state")[item]
  tensors = {param_path(path): value for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]}
  return step, Source(tensors, f"checkpoint {directory / str(step)}")


def load_checkpoint_params(directory: str | Path, model: nnx.Module, step: int | None = None,
                           item: str = "params", optional: tuple[str, ...] = ()) -> tuple[int, ConversionReport]:
  """Loads the model parameters of checkpoint `step` (default: the latest) in `directory` into `model`,
  e.g. for evaluation. A checkpoint of another config fails naming every parameter that differs, with both
  shapes, except that parameters under an `optional` prefix may be missing (a Q-DOVE started from a DOVE
  run). Returns the step and the report."""
  step, source = read_checkpoint_params(directory, step, item)
  return step, fill_by_path(model, source, optional)
