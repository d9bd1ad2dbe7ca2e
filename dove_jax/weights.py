"""Saving and loading a model's parameters as one safetensors file keyed by parameter path.

A file made by `python -m dove_jax.convert` or `python -m dove_jax.export` loads with `load_weights`; any
name or shape disagreement is reported per parameter, with both shapes, before anything is changed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from dove_jax.convert.common import ConversionReport, Source, fill_by_path, param_dict, read_tensors


def save_weights(model: nnx.Module, path: str | Path, part: str = "") -> int:
  """Writes the parameters of `model` (only those under the path prefix `part`, e.g. "vqgan", if given)
  keyed by their full paths. Returns how many tensors were written."""
  from safetensors.numpy import save_file
  tensors = {name: np.asarray(var[...]) for name, var in param_dict(model).items()
             if not part or name.startswith(part.rstrip("/") + "/")}
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
    from dove_jax.training.checkpoint import read_checkpoint_params
    return read_checkpoint_params(path)[1]
  return Source(read_tensors(path), str(path))


def subtree(source: Source, prefix: str) -> Source:
  """The tensors under `prefix` ('vqgan/'), keyed relative to it: to fill that submodule alone."""
  return Source({name[len(prefix):]: value for name, value in source.tensors.items() if name.startswith(prefix)},
                f"{source.origin} ({prefix.rstrip('/')})")


def load_weights(model: nnx.Module, path: str | Path, optional: tuple[str, ...] = ()) -> ConversionReport:
  """Every parameter of `model` from the file; those under an `optional` prefix may be missing there."""
  return fill_by_path(model, Source(read_tensors(path), str(path)), optional)
