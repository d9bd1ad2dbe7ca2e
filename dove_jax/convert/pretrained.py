"""Initialising DOVE from the pretrained weights the paper starts from: a diffusers VQModel for the VQGAN and
a Pythia checkpoint for both transformers (the generator's and the token decoder's blocks) and, for Q-DOVE,
the query embedding (Pythia's input embedding: its tokenizer's ids then mean what Pythia learned)."""
from __future__ import annotations

from pathlib import Path

from dove_jax.convert.common import ConversionReport, Source, fill_params
from dove_jax.convert.diffusers_vq import load_diffusers_vqgan
from dove_jax.convert.neox import load_pythia, read_embed_in
from dove_jax.models.dove import DOVE


def load_pretrained(model: DOVE, *, vqgan: str | Path | None = None,
                    pythia: str | Path | None = None) -> list[ConversionReport]:
  """Loads whichever weights are given into `model` in place; the rest keeps its initialisation."""
  reports = []
  if vqgan:
    reports.append(load_diffusers_vqgan(model.vqgan, vqgan))
  if pythia:
    reports.append(load_pythia(model.generator.transformer, pythia))
    reports.append(load_pythia(model.token_decoder.transformer, pythia))
    if model.query_embed is not None:
      source = Source({"embed_in": read_embed_in(pythia)}, f"{pythia} (embed_in)")
      reports.append(fill_params(model.query_embed, {"embedding": source.take("embed_in")}, source,
                                 prefix="query_embed/"))
  return reports
