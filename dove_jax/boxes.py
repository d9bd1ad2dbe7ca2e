"""Query boxes: where in an image a Q-DOVE query points, and the pixels the query loss compares there.

A box is (ymin, xmin, ymax, xmax) in [0, 1] of the image's height and width, the TFDS convention. Pixel
(i, j) of an H x W image belongs to a box when its centre ((i + 0.5) / H, (j + 0.5) / W) lies inside it,
ends included at the low side and excluded at the high side, so boxes that meet at an edge share no pixel.

Each image carries up to K boxes, padded with a mask ([B, K, 4] and [B, K]), so batches have static shapes.
An image with an empty query (or no valid box) is reconstructed as a whole: its relevant region is the
whole-image box. The NumPy functions run on the host in the input pipeline; the JAX ones in the train step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


# -- host side: checking and moving boxes with the image crop --------------------------------------------


def check_boxes(boxes, where: str) -> np.ndarray:
  """float32 [R, 4] boxes, or ValueError naming `where` (the record) and the first bad box.

  A box must be finite, inside [0, 1] and have a positive height and width.
  """
  boxes = np.asarray(boxes, np.float32)
  if boxes.ndim != 2 or boxes.shape[-1] != 4:
    raise ValueError(
        f"{where}: boxes must have shape [num_boxes, 4] (ymin, xmin, ymax, xmax); "
        f"got {boxes.shape}"
    )
  for index, (ymin, xmin, ymax, xmax) in enumerate(boxes):
    problem = None
    if not np.all(np.isfinite(boxes[index])):
      problem = "is not finite"
    elif min(ymin, xmin) < 0 or max(ymax, xmax) > 1:
      problem = "lies (partly) outside the image: coordinates must be in [0, 1]"
    elif ymax <= ymin or xmax <= xmin:
      problem = "is empty: it needs ymin < ymax and xmin < xmax"
    if problem:
      raise ValueError(
          f"{where}: box {index} (ymin, xmin, ymax, xmax) = "
          f"({ymin:.4g}, {xmin:.4g}, {ymax:.4g}, {xmax:.4g}) {problem}"
      )
  return boxes


def crop_boxes_np(
    boxes: np.ndarray, height: int, width: int, top: int, left: int, size: int
) -> np.ndarray:
  """Boxes [R, 4] of a height x width image -> boxes of its `size` x `size` crop at (top, left), clipped.
  A box that falls outside the crop comes out empty (ymax <= ymin or xmax <= xmin)."""
  scale = np.array([height, width, height, width], np.float32)
  offset = np.array([top, left, top, left], np.float32)
  return np.clip((boxes * scale - offset) / size, 0.0, 1.0).astype(np.float32)


def flip_boxes_np(boxes: np.ndarray) -> np.ndarray:
  """Boxes [R, 4] of an image -> boxes of the image mirrored left-right."""
  ymin, xmin, ymax, xmax = np.moveaxis(boxes, -1, 0)
  return np.stack([ymin, 1 - xmax, ymax, 1 - xmin], axis=-1).astype(np.float32)


def nonempty(boxes: np.ndarray) -> np.ndarray:
  """[R] bool: the boxes with a positive height and width."""
  return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])


# -- device side: masks and crops -------------------------------------------------------------------------


def has_query_boxes(box_mask: jax.Array, query_mask: jax.Array) -> jax.Array:
  """box_mask [B, K], query_mask [B, Q] bool -> [B] bool: the image has a query (a token that is not padding)
  and a valid box for it, so its relevant region is its boxes rather than the whole image."""
  return jnp.any(query_mask, axis=1) & jnp.any(box_mask, axis=1)


def relevant_boxes(
    boxes: jax.Array, box_mask: jax.Array, query_mask: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """The boxes the query loss uses: those given, or the whole image where the query is empty (every token
  padding, e.g. a dropped query) or has no valid box.

  boxes [B, K, 4], box_mask [B, K] bool, query_mask [B, Q] bool -> (boxes [B, K, 4], box_mask [B, K]).
  """
  whole = ~has_query_boxes(box_mask, query_mask)  # [B]
  first = jnp.arange(boxes.shape[1]) == 0  # [K]
  whole_boxes = jnp.where(
      first[:, None], jnp.asarray(WHOLE_IMAGE, boxes.dtype), boxes
  )  # [K, 4] per image
  boxes = jnp.where(whole[:, None, None], whole_boxes, boxes)
  box_mask = jnp.where(whole[:, None], first[None, :], box_mask)
  return boxes, box_mask


def pixel_masks(boxes: jax.Array, height: int, width: int) -> jax.Array:
  """boxes [..., 4] -> [..., H, W] bool: the pixels whose centre lies inside each box."""
  rows = (jnp.arange(height) + 0.5) / height  # [H]
  cols = (jnp.arange(width) + 0.5) / width  # [W]
  ymin, xmin, ymax, xmax = (boxes[..., i, None] for i in range(4))  # [..., 1] each
  inside_rows = (rows >= ymin) & (rows < ymax)  # [..., H]
  inside_cols = (cols >= xmin) & (cols < xmax)  # [..., W]
  return inside_rows[..., :, None] & inside_cols[..., None, :]


def union_mask(boxes: jax.Array, box_mask: jax.Array, height: int, width: int) -> jax.Array:
  """boxes [B, K, 4], box_mask [B, K] -> [B, H, W] bool: the pixels inside any valid box."""
  masks = pixel_masks(boxes, height, width) & box_mask[:, :, None, None]  # [B, K, H, W]
  return jnp.any(masks, axis=1)


def crop_and_resize(images: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
  """images [B, H, W, C], boxes [B, K, 4] -> crops [B, K, size, size, C].

  Each box is resampled to a fixed size (bilinear; antialiased, with a widened filter, when shrinking), so
  every crop has the
  same shape whatever its box; the aspect ratio is not kept. Differentiable in the images. A degenerate
  (padding) box gives a finite crop that the caller masks out.
  """
  _, height, width, channels = images.shape
  extent = jnp.asarray([height, width], jnp.float32)

  def crop_one(image, box):  # [H, W, C], [4] -> [size, size, C]
    start, stop = box[:2] * extent, box[2:] * extent  # pixel edges
    scale = size / jnp.maximum(stop - start, 1e-3)
    return jax.image.scale_and_translate(
        image,
        (size, size, channels),
        (0, 1),
        scale,
        -start * scale,
        method="linear",
        antialias=True,
    )

  per_image = jax.vmap(crop_one, in_axes=(None, 0))  # one image, K boxes
  return jax.vmap(per_image)(images, boxes.astype(jnp.float32)).astype(images.dtype)
