"""Initialising DOVE from the weights it starts from: a VQ-GAN (the paper's aMUSEd VQ-GAN as a diffusers
VQModel, or one trained here by `configs/vqgan.py`, stage 1 of the built-in recipe) and a Pythia checkpoint for
both transformers (the generator's and the token decoder's blocks) and, for Q-DOVE, the query embedding
(Pythia's input embedding: its tokenizer's ids then mean what Pythia learned)."""

from __future__ import annotations

from pathlib import Path

from dove_jax.convert.diffusers_vq import load_diffusers_vqgan
from dove_jax.convert.neox import load_pythia, read_embed_in
from dove_jax.models.dove import DOVE
from dove_jax.models.vqgan import VQGAN
from dove_jax.tensor_io import ConversionReport, Source, fill_by_path, fill_params

OWN_VQGAN_PREFIX = "vqgan/"  # our parameter paths of the VQ-GAN inside DOVE


def is_own_weights(path: str | Path) -> bool:
  """True for weights written by this project (a run's workdir, or a safetensors file whose tensors are keyed
  by our parameter paths), False for a diffusers/PyTorch checkpoint."""
  path = Path(path).expanduser()
  if path.is_dir():
    return (path / "checkpoints").is_dir()
  if path.suffix != ".safetensors" or not path.is_file():
    return False
  from safetensors import safe_open

  with safe_open(str(path), "np") as f:
    return (f.metadata() or {}).get("format") == "dove-jax"


def load_vqgan(model: VQGAN, path: str | Path) -> ConversionReport:
  """The VQ-GAN from a diffusers VQModel (folder, .safetensors or .bin) or from our own weights: a stage-1
  run's workdir (`configs/vqgan.py`) or a file `python -m dove_jax.export` wrote, whose `vqgan/` tensors are
  taken (any others, e.g. the transformers of a whole DOVE, are left aside)."""
  if not is_own_weights(path):
    return load_diffusers_vqgan(model, path)
  from dove_jax.weights import read_weights, subtree

  return fill_by_path(model, subtree(read_weights(path), OWN_VQGAN_PREFIX))


def load_pretrained(
    model: DOVE, *, vqgan: str | Path | None = None, pythia: str | Path | None = None
) -> list[ConversionReport]:
  """Loads whichever weights are given into `model` in place; the rest keeps its initialisation."""
  reports = []
  if vqgan:
    reports.append(load_vqgan(model.vqgan, vqgan))
  if pythia:
    reports.append(load_pythia(model.generator.transformer, pythia))
    reports.append(load_pythia(model.token_decoder.transformer, pythia))
    if model.query_embed is not None:
      source = Source({"embed_in": read_embed_in(pythia)}, f"{pythia} (embed_in)")
      reports.append(
          fill_params(
              model.query_embed,
              {"embedding": source.take("embed_in")},
              source,
              prefix="query_embed/",
          )
      )
  return reports
