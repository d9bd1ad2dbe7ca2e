"""Pythia / GPT-NeoX checkpoints (Hugging Face layout) -> `NeoXTransformer`.

NeoXBlock keeps Pythia's fused `query_key_value` layout ([heads, (q, k, v), head_dim] along the outputs), so
every linear layer converts with a plain transpose and every LayerNorm weight becomes a scale.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Mapping

import numpy as np

from dove_jax.models.neox import NeoXTransformer
from dove_jax.tensor_io import (
    ConversionError,
    ConversionReport,
    Source,
    fill_params,
    join,
    linear_kernel,
    read_json_config,
    read_tensors,
)

# config.json field -> NeoXTransformer keyword (and attribute) that must agree with it.
_ARCHITECTURE = (
    ("hidden_size", "d_model"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_heads"),
    ("intermediate_size", "mlp_dim"),
    ("rotary_pct", "rotary_pct"),
    ("rotary_emb_base", "rotary_base"),
    ("layer_norm_eps", "layer_norm_eps"),
)
# config.json fields NeoXBlock hard-codes: parallel residual, erf GELU, biased attention, unscaled rotary.
_FIXED = {
    "use_parallel_residual": True,
    "hidden_act": "gelu",
    "attention_bias": True,
    "rope_type": "default",
}
# What transformers assumes when config.json leaves a field out.
_HF_DEFAULTS = {"rotary_pct": 0.25, "rotary_emb_base": 10000.0, "layer_norm_eps": 1e-5, **_FIXED}
# transformers >= 5 writes the rotary fields inside rope_parameters, under these names.
_ROPE_PARAMETERS = {
    "rotary_pct": "partial_rotary_factor",
    "rotary_emb_base": "rope_theta",
    "rope_type": "rope_type",
}


def _norm(source: Source, key: str, path: str) -> dict:
  return {
      join(path, "scale"): source.take(f"{key}.weight"),
      join(path, "bias"): source.take(f"{key}.bias"),
  }


def _linear(source: Source, key: str, path: str) -> dict:
  return {
      join(path, "kernel"): linear_kernel(source.take(f"{key}.weight")),
      join(path, "bias"): source.take(f"{key}.bias"),
  }


# Pythia name under layers.{i}, our path under layers/{i}, converter.
_BLOCK_TENSORS = (
    ("input_layernorm", "attn_norm", _norm),
    ("post_attention_layernorm", "mlp_norm", _norm),
    ("attention.query_key_value", "qkv", _linear),
    ("attention.dense", "attn_out", _linear),
    ("mlp.dense_h_to_4h", "mlp_in", _linear),
    ("mlp.dense_4h_to_h", "mlp_out", _linear),
)


def neox_values_from_hf(
    source: Source, model: NeoXTransformer, prefix: str = "gpt_neox."
) -> dict[str, np.ndarray | None]:
  """Our parameter paths -> arrays taken from a GPT-NeoX state dict whose keys start with `prefix`."""
  values = _norm(source, f"{prefix}final_layer_norm", "final_norm")
  for i in range(len(model.layers)):
    for theirs, ours, convert in _BLOCK_TENSORS:
      values.update(convert(source, f"{prefix}layers.{i}.{theirs}", join("layers", i, ours)))
  return values


def _ignorable(prefix: str) -> dict[str, str]:
  return {
      f"{prefix}embed_in.weight": "token embedding: NeoXTransformer takes embeddings (see read_embed_in)",
      "embed_out.weight": "language-model head, not part of the transformer",
      "*.attention.bias": "causal-mask buffer of old transformers versions; the mask is built at run time",
      "*.attention.masked_bias": "mask fill-value buffer of old transformers versions",
      "*.attention.rotary_emb.inv_freq": "rotary frequency buffer; recomputed from rotary_emb_base",
  }


def _architecture(model: NeoXTransformer) -> dict:
  return {kwarg: getattr(model, kwarg) for _, kwarg in _ARCHITECTURE}


def load_pythia(
    model: NeoXTransformer,
    path_or_tensors: str | Path | Mapping[str, np.ndarray],
    *,
    prefix: str = "gpt_neox.",
) -> ConversionReport:
  """Fills `model` from a Pythia checkpoint: a Hugging Face folder, a weight file, or a dict of tensors.

  A folder's config.json is checked first, so a wrong model size fails with the differing config fields
  rather than a list of shape mismatches. The model is left untouched on any error.
  """
  if isinstance(path_or_tensors, Mapping):
    source = Source(path_or_tensors, "Pythia tensors")
  else:
    path = Path(path_or_tensors)
    if path.is_dir():
      check_neox_config(path, _architecture(model))
    source = Source(read_tensors(path), str(path))
  return fill_params(model, neox_values_from_hf(source, model, prefix), source, _ignorable(prefix))


def _config_fields(config: Mapping) -> dict:
  """config.json values under their GPT-NeoX names, with transformers' defaults for absent ones."""
  rope = config.get("rope_parameters") or {}
  old_scaling = (
      config.get("rope_scaling") or {}
  )  # transformers < 5: {"type": "linear", ...} or null
  fields = {**_HF_DEFAULTS, **config, "rope_type": old_scaling.get("type", "default")}
  fields.update({field: rope[name] for field, name in _ROPE_PARAMETERS.items() if name in rope})
  return fields


def check_neox_config(folder_or_config_dict: str | Path | Mapping, model_kwargs: Mapping) -> None:
  """Raises ConversionError naming every config.json field that disagrees with a NeoXTransformer.

  `model_kwargs` are NeoXTransformer keywords (a preset, say); omitted ones take the constructor defaults.
  """
  if isinstance(folder_or_config_dict, Mapping):
    config, origin = folder_or_config_dict, "config"
  else:
    config, origin = read_json_config(folder_or_config_dict), f"{folder_or_config_dict}/config.json"
  defaults = {
      name: p.default
      for name, p in inspect.signature(NeoXTransformer.__init__).parameters.items()
      if p.default is not inspect.Parameter.empty
  }
  ours = {**defaults, **model_kwargs}
  fields = _config_fields(config)
  problems = [
      f"{field}: config has {fields.get(field)!r}, model has {kwarg}={ours[kwarg]!r}"
      for field, kwarg in _ARCHITECTURE
      if fields.get(field) != ours[kwarg]
  ]
  problems += [
      f"{field}: config has {fields[field]!r}, NeoXTransformer supports only {needed!r}"
      for field, needed in _FIXED.items()
      if fields[field] != needed
  ]
  if problems:
    raise ConversionError(f"{origin} does not match the model:\n  " + "\n  ".join(problems))


def read_embed_in(path: str | Path, *, prefix: str = "gpt_neox.") -> np.ndarray:
  """Pythia's token embedding [vocab, D], which Q-DOVE's query embedding starts from."""
  key = f"{prefix}embed_in.weight"
  tensors = read_tensors(path)
  if key not in tensors:
    raise ConversionError(f"{path} has no {key}")
  return tensors[key]
