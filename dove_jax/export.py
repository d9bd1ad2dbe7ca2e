"""Writes a training run's parameters to a weights file (safetensors keyed by parameter path), or the
model to a folder.

  python -m dove_jax.export --workdir runs/tiny --out dove.safetensors            the latest checkpoint
  python -m dove_jax.export --workdir runs/vqgan_tiny --part vqgan --out vqgan.safetensors --step 3000
  python -m dove_jax.export --workdir runs/tiny --out models/tiny                 a model folder

The file loads with `dove_jax.load_weights` (a whole model), as `--config.init.weights` or `eval.py
--weights`; a `--part vqgan` file is a stage-1 VQ-GAN for `--config.init.vqgan`. A folder (any --out not
ending in .safetensors) holds config.json and model.safetensors: `DOVE.from_pretrained(folder)`;
and, unless --noportable, encode and decode as `jax.export` functions that run with jax alone
(`dove_jax.portable`).
"""

import sys

from absl import app, flags

from dove_jax.evaluation import run
from dove_jax.portable import QUERY_LENGTH, export_portable
from dove_jax.weights import save_pretrained, save_weights

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "the training run (its checkpoints/ and config.json)", required=True
)
_OUT = flags.DEFINE_string(
    "out", None, "the .safetensors file to write, or else the model folder", required=True
)
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the latest)")
_PART = flags.DEFINE_string("part", "", "only the parameters under this path prefix, e.g. vqgan")
_PORTABLE = flags.DEFINE_boolean(
    "portable",
    True,
    "with a model folder, also write encode and decode as jax.export functions that need only jax",
)


def main(argv):
  del argv
  try:
    config = run.load_run_config(_WORKDIR.value)
    model, origin = run.load_model(config, _WORKDIR.value, step=_STEP.value)
    if _OUT.value.endswith(".safetensors"):
      count = save_weights(model, _OUT.value, part=_PART.value)
    elif _PART.value:
      raise ValueError("--part writes a .safetensors file, not a model folder")
    else:
      count = save_pretrained(model, _OUT.value)
      if _PORTABLE.value:  # a Q-DOVE run's queries are padded to its query.max_length
        query_length = config.query.max_length if "query" in config else QUERY_LENGTH
        export_portable(model, _OUT.value, query_length=query_length)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"export: {e}")
  print(f"wrote {count} tensors of step {origin['step']} to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
