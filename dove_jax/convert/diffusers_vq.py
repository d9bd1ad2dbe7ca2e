"""diffusers `VQModel` checkpoints (e.g. the aMUSEd / open-MUSE VQ-GAN) -> `dove_jax.models.vqgan.VQGAN`.

The block structure is read off our model, so any `VQGAN` configuration converts; a checkpoint of another
configuration fails in `fill_params` with every mismatching parameter named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from dove_jax.models.vqgan import MidBlock, ResnetBlock, Stage, VQGAN
from dove_jax.tensor_io import (
    ConversionError,
    ConversionReport,
    Source,
    conv_kernel,
    fill_params,
    join,
    linear_kernel,
    read_json_config,
    read_tensors,
)

Values = dict[str, np.ndarray | None]

# Attention projections: (ours, current diffusers name, name in checkpoints saved by older diffusers).
_ATTENTION_NAMES = (
    ("to_q", "to_q", "query"),
    ("to_k", "to_k", "key"),
    ("to_v", "to_v", "value"),
    ("to_out", "to_out.0", "proj_attn"),
)


def _conv(source: Source, ours: str, theirs: str) -> Values:
  return {
      join(ours, "kernel"): conv_kernel(source.take(f"{theirs}.weight")),
      join(ours, "bias"): source.take(f"{theirs}.bias"),
  }


def _linear(source: Source, ours: str, theirs: str) -> Values:
  return {
      join(ours, "kernel"): linear_kernel(source.take(f"{theirs}.weight")),
      join(ours, "bias"): source.take(f"{theirs}.bias"),
  }


def _norm(source: Source, ours: str, theirs: str) -> Values:
  """torch GroupNorm weight is our scale."""
  return {
      join(ours, "scale"): source.take(f"{theirs}.weight"),
      join(ours, "bias"): source.take(f"{theirs}.bias"),
  }


def _resnet(source: Source, block: ResnetBlock, ours: str, theirs: str) -> Values:
  values = {}
  for name, convert in (("norm1", _norm), ("conv1", _conv), ("norm2", _norm), ("conv2", _conv)):
    values |= convert(source, join(ours, name), f"{theirs}.{name}")
  if block.conv_shortcut is not None:
    values |= _conv(source, join(ours, "conv_shortcut"), f"{theirs}.conv_shortcut")
  return values


def _attention(source: Source, ours: str, theirs: str) -> Values:
  legacy = (
      f"{theirs}.to_q.weight" not in source.tensors and f"{theirs}.query.weight" in source.tensors
  )
  values = _norm(source, join(ours, "group_norm"), f"{theirs}.group_norm")
  for name, current, old in _ATTENTION_NAMES:
    values |= _linear(source, join(ours, name), f"{theirs}.{old if legacy else current}")
  return values


def _mid_block(source: Source, block: MidBlock, ours: str, theirs: str) -> Values:
  values = {}
  for i, resnet in enumerate(block.resnets):
    values |= _resnet(source, resnet, join(ours, "resnets", i), f"{theirs}.resnets.{i}")
  if block.attention is not None:
    values |= _attention(source, join(ours, "attention"), f"{theirs}.attentions.0")
  return values


def _stage(source: Source, stage: Stage, ours: str, theirs: str, resampler: str) -> Values:
  """`resampler`: diffusers' list name for the stage's resampling conv, 'downsamplers' or 'upsamplers'."""
  values = {}
  for i, resnet in enumerate(stage.resnets):
    values |= _resnet(source, resnet, join(ours, "resnets", i), f"{theirs}.resnets.{i}")
  if stage.resample is not None:
    values |= _conv(source, join(ours, "resample", "conv"), f"{theirs}.{resampler}.0.conv")
  return values


def _ends(source: Source, prefix: str) -> Values:
  """conv_in, conv_norm_out and conv_out, which the encoder and decoder share."""
  values = {}
  for name, convert in (("conv_in", _conv), ("conv_norm_out", _norm), ("conv_out", _conv)):
    values |= convert(source, join(prefix, name), f"{prefix}.{name}")
  return values


def vqgan_values_from_diffusers(source: Source, model: VQGAN) -> Values:
  """Our parameter paths -> arrays taken from a diffusers `VQModel` state dict (None where it lacks one)."""
  values = _ends(source, "encoder") | _ends(source, "decoder")
  for i, stage in enumerate(model.encoder.down_blocks):
    values |= _stage(
        source, stage, join("encoder", "down_blocks", i), f"encoder.down_blocks.{i}", "downsamplers"
    )
  for i, stage in enumerate(model.decoder.up_blocks):
    values |= _stage(
        source, stage, join("decoder", "up_blocks", i), f"decoder.up_blocks.{i}", "upsamplers"
    )
  for part in ("encoder", "decoder"):
    values |= _mid_block(
        source, getattr(model, part).mid_block, f"{part}/mid_block", f"{part}.mid_block"
    )
  values |= _conv(source, "quant_conv", "quant_conv") | _conv(
      source, "post_quant_conv", "post_quant_conv"
  )
  values["quantizer/embedding"] = source.take("quantize.embedding.weight")
  return values


def _check_config(config: Mapping, model: VQGAN, origin: str) -> None:
  """What shapes cannot reveal: the norm type, the activation and the number of GroupNorm groups."""
  expected = {
      "norm_type": "group",
      "act_fn": "silu",
      "norm_num_groups": model.encoder.conv_norm_out.num_groups,
  }
  problems = [
      f"config {key}={config[key]!r}, model needs {want!r}"
      for key, want in expected.items()
      if key in config and config[key] != want
  ]
  if problems:
    raise ConversionError(f"{origin} does not fit the model:\n  " + "\n  ".join(problems))


def load_diffusers_vqgan(
    model: VQGAN, path_or_tensors: str | Path | Mapping[str, np.ndarray]
) -> ConversionReport:
  """Fills `model` from a diffusers VQModel folder (config.json + weights), a .safetensors / .bin file, or a
  state dict of arrays. Raises ConversionError, leaving the model untouched, if anything does not fit.
  """
  if isinstance(path_or_tensors, Mapping):
    source = Source(path_or_tensors, "diffusers VQModel state dict")
  else:
    path = Path(path_or_tensors)
    if path.is_dir() and (path / "config.json").exists():
      _check_config(read_json_config(path), model, str(path))
    source = Source(read_tensors(path), str(path))
  return fill_params(model, vqgan_values_from_diffusers(source, model), source)
