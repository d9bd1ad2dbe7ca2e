"""Config -> objects, shared by training and evaluation: the model with its initial weights, the data
sources, and Q-DOVE's query tokenizer and input-pipeline step."""

from __future__ import annotations

from pathlib import Path

import ml_collections
from absl import logging
from flax import nnx

from dove_jax.convert.pretrained import load_pretrained
from dove_jax.models.dove import DOVE
from dove_jax.weights import load_checkpoint_params, load_weights


def query_tokenizer(config: ml_collections.ConfigDict):
  """The configured query tokenizer; "gpt-neox" reads tokenizer.json from query.tokenizer_path, or else
  from the init.pythia folder."""
  from dove_jax import text

  return text.load_tokenizer(
      config.query.tokenizer, config.query.tokenizer_path or config.init.pythia
  )


def query_step(config: ml_collections.ConfigDict):
  """The input pipeline's query step for Q-DOVE (None for DOVE)."""
  if "query" not in config:
    return None
  from dove_jax.data.queries import SelectQuery

  return SelectQuery(query_tokenizer(config), config.query.max_length, config.query.max_boxes)


def data_sources(config: ml_collections.ConfigDict):
  """(train, eval) random-access sources for the configured data set."""
  from dove_jax.data import builtin, sources

  data = config.data
  data_dir = str(Path(data.data_dir).expanduser())
  if data.source == "builtin":
    return builtin.load_builtin(config.model.image_size, data_dir)
  if data.source == "tfds":
    return (
        sources.tfds_source(data.name, data.train_split, data_dir),
        sources.tfds_source(data.name, data.eval_split, data_dir),
    )
  if data.source == "visual_genome":
    from dove_jax.data.visual_genome import VisualGenomeSource

    regions = VisualGenomeSource(Path(data.folder).expanduser())
    return sources.split_off(regions, data.eval_size)
  # The held-out images (a hash of each path below data.eval_fraction) are never trained on.
  return sources.folder_split(
      sources.ImageFolderSource(Path(data.folder).expanduser()), data.eval_fraction
  )


def build_model(config: ml_collections.ConfigDict) -> DOVE:
  """DOVE from the config, initialised from the configured weights: the pretrained VQGAN and Pythia first,
  then a whole-model weights file or a run's checkpoint on top. A Q-DOVE started from a DOVE keeps its
  query embedding (from Pythia, or random) where the DOVE weights have none."""
  model = DOVE(**config.model, rngs=nnx.Rngs(config.seed))
  for report in load_pretrained(model, vqgan=config.init.vqgan, pythia=config.init.pythia):
    logging.info("%s", report)
  optional = ("query_embed",)
  if config.init.weights:
    logging.info("%s", load_weights(model, config.init.weights, optional=optional))
  if config.init.checkpoint:
    step, report = load_checkpoint_params(config.init.checkpoint, model, optional=optional)
    logging.info("step %d of %s", step, report)
  return model
