"""Converts pretrained PyTorch weights into a DOVE weights file.

  python -m dove_jax.convert --config configs/dove.py --vqgan PATH --pythia PATH --out dove.safetensors

--vqgan: a diffusers VQModel folder, .safetensors or .bin file (torch files load with weights_only=True).
--pythia: a Hugging Face GPT-NeoX folder (config.json + weights); its shapes must match the config.
Parts not given keep the random initialisation drawn from the config's seed.
"""

import sys

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from dove_jax.convert.pretrained import load_pretrained
from dove_jax.models.dove import DOVE
from dove_jax.tensor_io import ConversionError
from dove_jax.weights import save_weights

_CONFIG = config_flags.DEFINE_config_file("config", "configs/dove.py", "DOVE config file[:preset].")
_VQGAN = flags.DEFINE_string("vqgan", None, "diffusers VQModel weights (folder or file).")
_PYTHIA = flags.DEFINE_string("pythia", None, "Pythia / GPT-NeoX Hugging Face folder.")
_OUT = flags.DEFINE_string("out", None, "output .safetensors file.", required=True)


def main(argv):
  del argv
  config = _CONFIG.value
  model = DOVE(**config.model, rngs=nnx.Rngs(config.seed))
  try:
    reports = load_pretrained(
        model, vqgan=_VQGAN.value or config.init.vqgan, pythia=_PYTHIA.value or config.init.pythia
    )
  except (ConversionError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")  # the message names every problem; a traceback would only bury it
  for report in reports:
    print(report)
  save_weights(model, _OUT.value)
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
