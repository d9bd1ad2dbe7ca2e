"""Saving and loading a whole model's parameters as one safetensors file keyed by parameter path.

A file made by `python -m dove_jax.convert` loads with `load_weights`; any name or shape disagreement is
reported per parameter, with both shapes, before anything is changed.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from dove_jax.convert.common import ConversionReport, Source, fill_params, param_dict, read_tensors


def save_weights(model: nnx.Module, path: str | Path) -> None:
  from safetensors.numpy import save_file
  Path(path).parent.mkdir(parents=True, exist_ok=True)
  save_file({name: np.asarray(var[...]) for name, var in param_dict(model).items()}, str(path),
            metadata={"format": "dove-jax"})


def load_weights(model: nnx.Module, path: str | Path) -> ConversionReport:
  source = Source(read_tensors(path), str(path))
  return fill_params(model, {name: source.take(name) for name in param_dict(model)}, source)
