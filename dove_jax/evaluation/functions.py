"""The compiled functions of evaluation, shared by the in-training evaluator and eval.py: encode, decode and
reconstruct-with-figures over the split model state, plus the small pieces they need (a batch's query
arguments, MSE inside and outside the query's boxes, the mean token)."""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dove_jax import losses, xla
from dove_jax.boxes import relevant_boxes, union_mask
from dove_jax.evaluation import metrics
from dove_jax.models.dove import Tokens


def query_inputs(batch: dict, with_query: bool = True) -> dict:
  """The model's query arguments from a batch: {} for DOVE; for Q-DOVE the query, or (with_query=False)
  the same ids all masked, which is no query."""
  if "query_ids" not in batch:
    return {}
  mask = jnp.asarray(batch["query_mask"])
  return {
      "query": jnp.asarray(batch["query_ids"]),
      "query_mask": mask if with_query else jnp.zeros_like(mask),
  }


def model_inputs(batch: dict, budget: int, with_query: bool = True) -> tuple[np.ndarray, dict]:
  """A host batch's [B] budgets (`budget` for every image, 0 = its predicted length) and its query
  arguments (`query_inputs`), to be placed on the devices as the batch is."""
  return np.full(len(batch["image"]), budget, np.int32), query_inputs(batch, with_query)


def box_mse(recon: jax.Array, images: jax.Array, batch: dict) -> dict[str, jax.Array]:
  """[B] MSE inside the query's boxes (the whole image for an empty query), [B] MSE outside them, and [B]
  whether the image has any pixel outside them (the outside MSE of one that has none is a 0 that means
  nothing)."""
  boxes, box_mask = relevant_boxes(
      *(jnp.asarray(batch[key]) for key in ("boxes", "box_mask", "query_mask"))
  )
  inside = union_mask(boxes, box_mask, *images.shape[1:3])  # [B, H, W]
  return {
      "mse_in_boxes": losses.outside_mse(recon, images, ~inside),
      "mse_outside_boxes": losses.outside_mse(recon, images, inside),
      "has_outside_pixels": ~jnp.all(inside, axis=(1, 2)),
  }


def measured_outside_mse(figures: dict) -> np.ndarray:
  """Host side: the outside-box MSEs [M] of the images with pixels outside their boxes (`box_mse`'s
  figures, [N] each); for the others it is a 0 that measures nothing."""
  return np.asarray(figures["mse_outside_boxes"])[np.asarray(figures["has_outside_pixels"], bool)]


def mean_token(tokens: Tokens) -> jax.Array:
  """[B, n, D] tokens -> [B, D]: the mean of each image's kept tokens (the linear-probe feature)."""
  kept = jnp.sum(tokens.tokens * tokens.mask[..., None], axis=1)  # [B, D]
  return kept / jnp.maximum(tokens.lengths, 1)[:, None]


class Functions(NamedTuple):
  encode: Callable
  decode: Callable
  reconstruct: Callable
  autoencode: Callable


def to_8_bits(images: jax.Array) -> jax.Array:
  """[B, H, W, 3] in [-1, 1] -> the nearest of the 256 levels an 8-bit image file holds, still in [-1, 1]:
  the image saved as PNG and read back (round half to even, as NumPy and PyTorch round)."""
  return jnp.round((images + 1) * 127.5) / 127.5 - 1


def figures(recon: jax.Array, images: jax.Array, lpips, uint8: bool = True) -> dict[str, jax.Array]:
  """Per-image quality [B] of the image a viewer gets: the decoder's output clipped to the valid range and,
  with `uint8`, rounded to 8 bits as an image file would be. SSIM is the standard one, of the images in
  [0, 1]; LPIPS unless `lpips` is None."""
  recon = jnp.clip(recon, -1, 1)  # [B, H, W, 3]
  if uint8:
    recon = to_8_bits(recon)
  out = {
      "reconstruction": recon,
      "mse": losses.mse_per_image(recon, images),
      "ssim": metrics.ssim((recon + 1) / 2, (images + 1) / 2),
  }
  if lpips is not None:
    out["lpips"] = lpips(recon, images)
  return out


def make_functions(model_def: nnx.GraphDef, uint8: bool = True) -> Functions:
  """The compiled (encode, decode, reconstruct, autoencode). A budget is an array argument ([B] ints, 0 = predicted
  length), so one compilation serves every budget. `query` is `query_inputs(batch)`: {} for DOVE. `uint8`:
  reconstructions are rounded to 8 bits before every figure (`figures`)."""

  @xla.jit(static_argnames="chunk_size")
  def encode(params, images, budget, query, chunk_size=0):
    return nnx.merge(model_def, params).encode(images, budget, **query, chunk_size=chunk_size)

  @xla.jit
  def decode(params, tokens):
    return nnx.merge(model_def, params).decode(tokens)

  @xla.jit
  def reconstruct(params, lpips, batch, budget, query):
    """-> per-image figures [B] (and the reconstructions and mean tokens) of `batch`'s images at `budget`;
    for Q-DOVE batches also the MSE inside and outside the query's boxes; LPIPS unless `lpips` is None.
    """
    model = nnx.merge(model_def, params)
    images = batch["image"]
    tokens = model.encode(images, budget, **query)
    out = figures(model.decode(tokens), images, lpips, uint8)
    out.update(lengths=tokens.lengths, features=mean_token(tokens))
    if "boxes" in batch:
      out.update(box_mse(out["reconstruction"], images, batch))
    return out

  @xla.jit
  def autoencode(params, lpips, batch):
    """The same figures for the VQ-GAN alone (encoder, codebook, decoder): the ceiling of DOVE's quality."""
    model = nnx.merge(model_def, params)
    return figures(model.vqgan(batch["image"])[0], batch["image"], lpips, uint8)

  return Functions(encode, decode, reconstruct, autoencode)
