"""That DOVE learns what it is for, fast: the tiny preset (from the shipped stage-1 VQ-GAN, frozen) overfits a
handful of fixed images far above their mean colour, the shipped DOVE reconstructs better with more tokens,
and the shipped Q-DOVE spends fewer with a query. These are the checks that failed while the model
reconstructed only each image's mean colour, and while a query lengthened the sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dove
from dove_jax import mesh as meshlib
from dove_jax.data import builtin, pipeline
from dove_jax.evaluation.functions import make_functions
from dove_jax.evaluation.metrics import psnr_from_mse
from dove_jax.training.setup import build_training

OVERFIT_STEPS = (
    200  # 0.12 s each on 2 cores; 20.2 dB here (21.8 at 300), 14.0 dB for the mean colours
)
NUM_IMAGES = 8


@pytest.fixture(scope="module")
def fixed_images(builtin_data_dir):
  """The first validation images of the built-in set: a host batch with `image` and `valid`."""
  _, validation = builtin.load_builtin(64, str(builtin_data_dir))
  return next(
      iter(
          pipeline.make_dataset(
              validation, image_size=64, global_batch_size=NUM_IMAGES, seed=0, train=False
          )
      )
  )


def mean_colour_psnr(images: np.ndarray) -> float:
  """PSNR of each image's own mean colour: what a model that learned no layout reaches."""
  flat = np.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape)
  return float(psnr_from_mse(np.mean((flat - images) ** 2)))


def test_tiny_dove_overfits_a_handful_of_images_far_above_their_mean_colour(fixed_images):
  config = dove.get_config("tiny")
  config.data.global_batch_size = NUM_IMAGES
  config.loss.random_length_fraction = (
      0.0  # every slot: the capacity check, not the length objective
  )
  config.optim.learning_rate, config.optim.warmup_steps = 3e-3, 20
  config.optim.final_learning_rate = (
      1.0  # a constant rate after the warmup: memorising, not generalising
  )
  mesh = meshlib.make_mesh(devices=jax.devices()[:1])
  setup = build_training(config, mesh, num_steps=OVERFIT_STEPS)
  batch = meshlib.global_batch(
      {"image": fixed_images["image"], "valid": fixed_images["valid"]}, mesh
  )
  state = setup.state
  for _ in range(OVERFIT_STEPS):
    state, metrics = setup.train_step(state, batch, setup.lpips)
  reconstruct = make_functions(setup.model_def).reconstruct
  full = reconstruct(state.params, None, batch, jnp.full(NUM_IMAGES, 64, jnp.int32), {})
  vqgan = make_functions(setup.model_def).autoencode(state.params, None, batch)
  psnr, ceiling = (float(psnr_from_mse(np.mean(out["mse"]))) for out in (full, vqgan))
  floor = mean_colour_psnr(np.asarray(fixed_images["image"]))
  assert psnr >= floor + 5.0, (psnr, floor, ceiling)
  assert psnr >= ceiling - 2.0, (psnr, floor, ceiling)  # its frozen VQ-GAN alone: 21.0 dB here


def test_shipped_dove_reconstructs_better_with_more_tokens(fixed_images, builtin_data_dir):
  """The shipped tiny DOVE (weights/tiny/dove.safetensors) loads into the tiny preset's model, and on the
  first 64 validation images its reconstructions improve from 8 to 64 tokens."""
  from dove_jax.evaluation.run import load_model

  config = dove.get_config("tiny")
  model, _ = load_model(
      config, workdir=None, weights=str(dove.SHIPPED / "tiny" / "dove.safetensors")
  )
  _, validation = builtin.load_builtin(64, str(builtin_data_dir))
  images = jnp.asarray(
      next(
          iter(
              pipeline.make_dataset(
                  validation, image_size=64, global_batch_size=64, seed=0, train=False
              )
          )
      )["image"]
  )
  psnr = {}
  for budget in (8, 64):
    recon = jnp.clip(model.decode(model.encode(images, budget)), -1, 1)
    psnr[budget] = float(psnr_from_mse(jnp.mean(jnp.square(recon - images))))
  assert psnr[64] > psnr[8], psnr
  assert psnr[64] > mean_colour_psnr(np.asarray(images)) + 2.0, psnr


def test_shipped_qdove_spends_fewer_tokens_with_a_query(builtin_data_dir):
  """The shipped tiny Q-DOVE (weights/tiny/qdove.safetensors) loads into configs/qdove.py:tiny's model, and on
  the first 64 validation images, each with one object's description, its sequences are shorter with the
  query than without it, for about the same quality inside the boxes (14.4 tokens against 27.7 here, 14.3 dB
  against 14.6; all 512 images: 12.6 tokens against 25.5, 14.27 dB against 14.18)."""
  from configs import qdove
  from dove_jax.builders import query_step
  from dove_jax.evaluation.functions import box_mse, query_inputs
  from dove_jax.evaluation.run import load_model

  config = qdove.get_config("tiny")
  model, _ = load_model(
      config, workdir=None, weights=str(dove.SHIPPED / "tiny" / "qdove.safetensors")
  )
  _, validation = builtin.load_builtin(64, str(builtin_data_dir))
  batch = next(
      iter(
          pipeline.make_dataset(
              validation,
              image_size=64,
              global_batch_size=64,
              seed=0,
              train=False,
              query=query_step(config),
          )
      )
  )
  images = jnp.asarray(batch["image"])
  lengths, in_boxes = {}, {}
  for with_query in (True, False):
    tokens = model.encode(images, **query_inputs(batch, with_query))
    recon = jnp.clip(model.decode(tokens), -1, 1)
    lengths[with_query] = float(jnp.mean(tokens.lengths))
    in_boxes[with_query] = float(
        psnr_from_mse(jnp.mean(box_mse(recon, images, batch)["mse_in_boxes"]))
    )
  assert lengths[True] < 0.7 * lengths[False], lengths
  assert in_boxes[True] > in_boxes[False] - 0.5, in_boxes
