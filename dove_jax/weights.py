"""A model's parameters keyed by parameter path: saved as one safetensors file, loaded from such a file or
from a training run's checkpoint.

A file made by `python -m dove_jax.convert` or `python -m dove_jax.export` loads with `load_weights`, a
checkpoint's parameters with `load_checkpoint_params`; any name or shape disagreement is reported per
parameter, with both shapes, before anything is changed.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dove_jax.tensor_io import ConversionReport, Source, fill_by_path, param_dict, param_path, read_tensors


def save_weights(model: nnx.Module, path: str | Path, part: str = "") -> int:
  """Writes the parameters of `model` (only those under the path prefix `part`, e.g. "vqgan", if given)
  keyed by their full paths. Returns how many tensors were written."""
  from safetensors.numpy import save_file

  tensors = {
      name: np.asarray(var[...])
      for name, var in param_dict(model).items()
      if not part or name.startswith(part.rstrip("/") + "/")
  }
  if not tensors:
    raise ValueError(f"the model has no parameter under {part!r}")
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  save_file(tensors, str(path), metadata={"format": "dove-jax"})
  return len(tensors)


def read_weights(path: str | Path) -> Source:
  """A dove-jax weights file, or a training run's workdir (its latest checkpoint's parameters), as tensors
  keyed by parameter path."""
  path = Path(path).expanduser()
  if path.is_dir():
    return read_checkpoint_params(path)[1]
  return Source(read_tensors(path), str(path))


def subtree(source: Source, prefix: str) -> Source:
  """The tensors under `prefix` ('vqgan/'), keyed relative to it: to fill that submodule alone."""
  return Source(
      {
          name[len(prefix) :]: value
          for name, value in source.tensors.items()
          if name.startswith(prefix)
      },
      f"{source.origin} ({prefix.rstrip('/')})",
  )


def load_weights(
    model: nnx.Module, path: str | Path, optional: tuple[str, ...] = ()
) -> ConversionReport:
  """Every parameter of `model` from the file; those under an `optional` prefix may be missing there."""
  return fill_by_path(model, Source(read_tensors(path), str(path)), optional)


def checkpoint_folder(path: str | Path) -> Path:
  """A run's workdir (holding checkpoints/) or its checkpoints/ folder itself -> the checkpoints folder."""
  directory = Path(path).expanduser().absolute()
  return directory / "checkpoints" if (directory / "checkpoints").is_dir() else directory


def read_checkpoint_params(
    directory: str | Path, step: int | None = None, item: str = "params"
) -> tuple[int, Source]:
  """The model parameters (`item` of the train state) of checkpoint `step` (default: the latest) in
  `directory` (a run's workdir or its checkpoints/ folder), keyed by parameter path. Returns the step and
  the tensors as a `Source`."""
  import orbax.checkpoint as ocp

  directory = checkpoint_folder(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint folder {directory}")
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps or (step is not None and step not in steps):
    wanted = "any checkpoint" if step is None else f"checkpoint {step}"
    raise FileNotFoundError(f"{wanted} not found in {directory} (steps there: {steps})")
  step = steps[-1] if step is None else step
  restored = ocp.StandardCheckpointer().restore(directory / str(step) / "state")[item]
  tensors = {
      param_path(path): value for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]
  }
  return step, Source(tensors, f"checkpoint {directory / str(step)}")


def load_checkpoint_params(
    directory: str | Path,
    model: nnx.Module,
    step: int | None = None,
    item: str = "params",
    optional: tuple[str, ...] = (),
) -> tuple[int, ConversionReport]:
  """Loads the model parameters of checkpoint `step` (default: the latest) in `directory` into `model`,
  e.g. for evaluation. A checkpoint of another config fails naming every parameter that differs, with both
  shapes, except that parameters under an `optional` prefix may be missing (a Q-DOVE started from a DOVE
  run). Returns the step and the report."""
  step, source = read_checkpoint_params(directory, step, item)
  return step, fill_by_path(model, source, optional)
