"""Saving and loading a whole model's parameters as one safetensors file keyed by parameter path.

A file made by `python -m dove_jax.convert` loads with `load_weights`; any name or shape disagreement is
reported per parameter, with both shapes, before anything is changed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from dove_jax.convert.common import ConversionReport, Source, fill_by_path, param_dict, read_tensors


def save_weights(model: nnx.Module, path: str | Path) -> None:
  from safetensors.numpy import save_file
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  save_file({name: np.asarray(var[...]) for name, var in param_dict(model).items()}, str(path),
            metadata={"format": "dove-jax"})


def load_weights(model: nnx.Module, path: str | Path, optional: tuple[str, ...] = ()) -> ConversionReport:
  """Every parameter of `model` from the file; those under an `optional` prefix may be missing there."""
  return fill_by_path(model, Source(read_tensors(path), str(path)), optional)
