"""Tensor I/O: reading tensor files (safetensors, PyTorch, model folders) without running their code,
naming parameters by path, and filling a module's parameters from named tensors, checked.

Every loader works the same way (the PyTorch converters in `dove_jax.convert`, weights files, checkpoints,
Inception): read the source tensors into a `Source` (it remembers which keys were taken), build a dict from
our parameter paths ('encoder/conv_in/kernel') to arrays, and hand it to `fill_params`, which checks every
name and shape before it changes anything.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
from flax import nnx


class ConversionError(ValueError):
  """A checkpoint does not fit the model; the message lists every offending parameter."""


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
  """Reads a safetensors file, a torch `.bin`/`.pt` file, or a Hugging Face / diffusers model folder.

  Torch files are opened with `weights_only=True`, so no pickled code runs. Torch is only imported for them.
  """
  path = Path(path)
  if path.is_dir():
    return _read_folder(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file

    try:
      return load_file(str(path))
    except Exception as e:  # bf16 tensors have no NumPy dtype, a truncated file fails to parse
      raise ConversionError(f"cannot read safetensors file {path}: {e}") from e
  if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
    try:
      import torch
    except ImportError as e:
      raise ConversionError(
          f"reading {path} needs PyTorch (pip install torch); "
          "or convert it to .safetensors first"
      ) from e
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
      state = state["state_dict"]
    return {
        k: v.detach().float().numpy() if v.dtype == torch.bfloat16 else v.detach().numpy()
        for k, v in state.items()
        if isinstance(v, torch.Tensor)
    }
  raise ConversionError(
      f"unknown checkpoint format {path.suffix!r} for {path}; "
      "expected .safetensors, .bin, .pt or a model folder"
  )


def _read_folder(folder: Path) -> dict[str, np.ndarray]:
  """All weight files of a model folder, sharded ones included; safetensors preferred over torch files."""
  for pattern in ("*.safetensors", "*.bin"):
    files = sorted(p for p in folder.glob(pattern) if not p.name.startswith("training_args"))
    if files:
      tensors: dict[str, np.ndarray] = {}
      for f in files:
        tensors.update(read_tensors(f))
      return tensors
  raise FileNotFoundError(f"no *.safetensors or *.bin weight file in {folder}")


def read_json_config(folder: str | Path) -> dict:
  """A model folder's config.json (Hugging Face, diffusers)."""
  path = Path(folder) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"no config.json in {folder}")
  return json.loads(path.read_text())


class Source:
  """Tensors of one checkpoint; remembers which keys a converter took so leftovers can be reported."""

  def __init__(self, tensors: Mapping[str, np.ndarray], origin: str):
    self.tensors = dict(tensors)
    self.origin = origin
    self.taken: set[str] = set()
    self.missing: list[str] = []

  def take(self, key: str) -> np.ndarray | None:
    """The tensor under `key`, or None (recorded as missing) if the checkpoint lacks it."""
    if key not in self.tensors:
      self.missing.append(key)
      return None
    self.taken.add(key)
    return np.asarray(self.tensors[key])

  def unused(self) -> list[str]:
    return sorted(set(self.tensors) - self.taken)


@dataclasses.dataclass
class ConversionReport:
  """What a conversion did: how many parameters were set, and what it left aside and why."""

  origin: str
  converted: int
  ignored: dict[str, str]  # source key -> reason it is not needed

  def __str__(self) -> str:
    lines = [f"{self.origin}: {self.converted} parameters converted"]
    lines += [f"  ignored {k}: {why}" for k, why in sorted(self.ignored.items())]
    return "\n".join(lines)


def join(*parts: Iterable[str] | str | int) -> str:
  """A parameter path from its parts: join("encoder", "down", 0) -> 'encoder/down/0'."""
  return "/".join(str(p) for p in parts)


def param_path(path) -> str:
  """A pytree path of an nnx.State leaf (or a flat-state key) -> 'vqgan/encoder/conv_in/kernel'."""
  names = [getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path]
  return join(*(names[:-1] if names and names[-1] == "value" else names))


def param_dict(module: nnx.Module) -> dict[str, nnx.Variable]:
  """The module's parameters keyed by their paths (`param_path`)."""
  return {param_path(path): var for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def fill_params(
    module: nnx.Module,
    values: Mapping[str, np.ndarray | None],
    source: Source,
    ignorable: Mapping[str, str] = {},
    *,
    prefix: str = "",
    optional: tuple[str, ...] = (),
) -> ConversionReport:
  """Copies `values` into `module`'s parameters after checking all of them.

  `values` maps parameter paths (relative to `module`) to arrays; None marks a tensor the source lacked.
  `ignorable` maps source keys that may stay unused to the reason why. Parameters under an `optional` path
  prefix may get no value: they keep theirs. Raises ConversionError naming every shape mismatch (with both
  shapes), every other parameter with no value, every value with no parameter and every unused source key
  that is not ignorable; on error the module is left untouched.
  """
  params = param_dict(module)
  problems = []
  for name in sorted(set(values) - set(params)):
    problems.append(f"converted tensor {prefix}{name} has no parameter in the model")
  for name in sorted(set(params) - set(values)):
    if not name.startswith(optional):
      problems.append(f"model parameter {prefix}{name} gets no value from the checkpoint")
  problems += [f"checkpoint lacks {key} (needed by the model)" for key in source.missing]
  for name, value in sorted(values.items()):
    if name in params and value is not None and tuple(value.shape) != tuple(params[name].shape):
      problems.append(
          f"parameter {prefix}{name}: checkpoint shape {tuple(value.shape)} "
          f"!= model shape {tuple(params[name].shape)}"
      )
  unused = [k for k in source.unused() if not any(_matches(k, pat) for pat in ignorable)]
  problems += [f"checkpoint tensor {k} is not used by the model" for k in unused]
  if problems:
    raise ConversionError(f"{source.origin} does not fit the model:\n  " + "\n  ".join(problems))
  for name, value in values.items():
    var = params[name]
    var[...] = np.asarray(value, dtype=var.dtype)
  ignored = {k: why for k in source.unused() for pat, why in ignorable.items() if _matches(k, pat)}
  return ConversionReport(source.origin, len(values), ignored)


def fill_by_path(
    module: nnx.Module, source: Source, optional: tuple[str, ...] = ()
) -> ConversionReport:
  """Fills `module` from a source keyed by our own parameter paths (a weights file, a checkpoint);
  parameters under an `optional` prefix that the source lacks keep their values."""
  values = {
      name: source.take(name)
      for name in param_dict(module)
      if name in source.tensors or not name.startswith(optional)
  }
  return fill_params(module, values, source, optional=optional)


def _matches(key: str, pattern: str) -> bool:
  """`pattern` is a key, or a key with one '*' standing for any run of characters."""
  if "*" not in pattern:
    return key == pattern
  head, tail = pattern.split("*", 1)
  return key.startswith(head) and key.endswith(tail) and len(key) >= len(head) + len(tail)


def conv_kernel(w: np.ndarray | None) -> np.ndarray | None:
  """PyTorch conv weight [O, I, kh, kw] -> Flax kernel [kh, kw, I, O]."""
  return None if w is None else w.transpose(2, 3, 1, 0)


def linear_kernel(w: np.ndarray | None) -> np.ndarray | None:
  """PyTorch linear weight [out, in] -> Flax kernel [in, out]."""
  return None if w is None else w.T
