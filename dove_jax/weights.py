"""A model's parameters keyed by parameter path: saved as one safetensors file, loaded from such a file or
from a training run's checkpoint; and a model folder (`save_pretrained`: config.json with the model's
keyword arguments and the versions that wrote it, model.safetensors), which `DOVE.from_pretrained` reads.

A file made by `python -m dove_jax.convert` or `python -m dove_jax.export` loads with `load_weights`, a
checkpoint's parameters with `load_checkpoint_params`; any name or shape disagreement is reported per
parameter, with both shapes, before anything is changed.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
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


MODEL_CONFIG, MODEL_WEIGHTS = "config.json", "model.safetensors"  # a model folder's two files


def save_pretrained(model: nnx.Module, directory: str | Path) -> int:
  """Writes `model` (a DOVE) as a folder that `DOVE.from_pretrained` rebuilds alone: config.json (its
  keyword arguments and the versions that wrote it) and model.safetensors. Returns how many tensors were
  written."""
  directory = Path(directory).expanduser()
  count = save_weights(model, directory / MODEL_WEIGHTS)
  versions = {name: importlib.metadata.version(name) for name in ("dove-jax", "jax", "flax")}
  config = {"model": json.loads(model.arguments), "versions": versions}
  (directory / MODEL_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
  return count


def read_model_arguments(directory: str | Path) -> dict:
  """The model's keyword arguments from a `save_pretrained` folder's config.json (lists as tuples)."""
  path = Path(directory).expanduser() / MODEL_CONFIG
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: not a model folder written by save_pretrained")
  config = json.loads(path.read_text())
  if "model" not in config:
    raise ValueError(f"{path} has no 'model' entry (the model's keyword arguments)")
  return lists_to_tuples(config["model"])


def lists_to_tuples(value):
  """JSON's lists back to the tuples a config held, in nested dicts and lists."""
  if isinstance(value, dict):
    return {key: lists_to_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(lists_to_tuples(item) for item in value)
  return value


def shaped_model(build: Callable[[], nnx.Module]) -> nnx.Module:
  """The module `build` makes, its parameters zeros of the right shapes: for a model whose every parameter
  comes from a file, skipping the random initialisers (run eagerly they take ~25 s for even the tiny DOVE
  on 2 CPU cores)."""
  model = nnx.eval_shape(build)
  nnx.update(model, jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), nnx.state(model)))
  return model


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
  directory = checkpoint_folder(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f"no checkpoint folder {directory}")
  steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  if not steps or (step is not None and step not in steps):
    wanted = "any checkpoint" if step is None else f"checkpoint {step}"
    raise FileNotFoundError(f"{wanted} not found in {directory} (steps there: {steps})")
  step = steps[-1] if step is None else step
  restored = restore_on_one_device(directory / str(step) / "state")[item]
  tensors = {
      param_path(path): value for path, value in jax.tree_util.tree_flatten_with_path(restored)[0]
  }
  return step, Source(tensors, f"checkpoint {directory / str(step)}")


def restore_on_one_device(path: str | Path):
  """A saved train state (an orbax StandardCheckpointer folder) on this process's first device, whatever
  devices or processes saved it."""
  import orbax.checkpoint as ocp

  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(
      lambda meta: jax.ShapeDtypeStruct(meta.shape, meta.dtype, sharding=device),
      checkpointer.metadata(Path(path).absolute()).item_metadata,
  )
  return checkpointer.restore(Path(path).absolute(), target)


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
