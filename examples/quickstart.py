"""Encode and decode a few images at the model's own lengths and at forced budgets.

  python examples/quickstart.py                           # the shipped tiny DOVE, synthetic images
  python examples/quickstart.py --model models/my_dove    # a model folder (python -m dove_jax.export)
  python examples/quickstart.py --config configs/dove.py  # the paper's model on random weights

A model folder holds everything the model needs (config.json + model.safetensors). With --config the model
has random weights, whose lengths and reconstructions mean nothing: the run then shows only the API, the
shapes and the speed of one compiled encode/decode that serves every length.
"""

import argparse
import importlib.util
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dove_jax import DOVE

SHIPPED = Path(__file__).resolve().parents[1] / "weights" / "tiny" / "dove"


def load_config(spec: str):
  """'configs/dove.py:tiny' -> that file's get_config('tiny')."""
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("dove_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset)


def synthetic_images(size: int) -> np.ndarray:
  """A flat image, a smooth gradient, stripes and noise: from nothing to describe to everything."""
  yy, xx = np.mgrid[0:size, 0:size] / size
  flat = np.full((size, size, 3), 0.3)
  gradient = np.stack([xx, yy, 1 - xx], -1) * 2 - 1
  stripes = np.repeat(np.sign(np.sin(xx * 40 + yy * 13))[..., None], 3, -1) * 0.8
  noise = np.random.default_rng(0).uniform(-1, 1, (size, size, 3))
  return np.stack([flat, gradient, stripes, noise]).astype(np.float32)  # [4, H, W, 3] in [-1, 1]


def main():
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument(
      "--model", default=str(SHIPPED), help="a model folder (default: the shipped tiny DOVE)"
  )
  parser.add_argument(
      "--config", help="a config file[:preset]: its model on random weights instead"
  )
  args = parser.parse_args()
  if args.config:
    model = DOVE(**load_config(args.config).model, rngs=nnx.Rngs(0))
    print(f"{args.config}: random weights")
  else:
    model = DOVE.from_pretrained(args.model)
    print(f"{args.model}: {model.image_size} px, up to {model.max_tokens} tokens")
  graphdef, state = nnx.split(model)

  @jax.jit
  def reconstruct(state, images, budget):
    model = nnx.merge(graphdef, state)
    tokens = model.encode(images, budget)
    return tokens.lengths, model.decode(tokens)

  images = jnp.asarray(synthetic_images(model.image_size))
  n = model.max_tokens
  for budget in [0, n // 8, n // 2, n]:  # 0: the model's own lengths
    start = time.perf_counter()
    lengths, recon = jax.block_until_ready(
        reconstruct(state, images, jnp.full((4,), budget, jnp.int32))
    )
    mse = np.mean((np.asarray(recon) - np.asarray(images)) ** 2, axis=(1, 2, 3))
    label = "predicted" if budget == 0 else f"budget {budget}"
    mse_text = ", ".join(f"{m:.4f}" for m in mse)
    print(
        f"{label:>10}: lengths {np.asarray(lengths).tolist()}  MSE [{mse_text}]  ({time.perf_counter() - start:.2f} s)"
    )


if __name__ == "__main__":
  main()
