"""The grain input pipeline: records from any source -> fixed-shape batches of model inputs.

  dataset = make_dataset(source, image_size=256, global_batch_size=64, seed=0, train=True)
  iterator = iter(dataset)      # a grain DatasetIterator
  batch = next(iterator)        # this process's share of the global batch:
  # image float32 [b, S, S, 3] in [-1, 1], label int32 [b], valid bool [b], complexity float32 [b]
  # and with query=queries.SelectQuery(...) (Q-DOVE): query_ids, query_mask, boxes, box_mask (queries.py)

An image that cannot be decoded does not stop training: it becomes a black image with valid=False (and a
warning naming its path), so shapes stay static and the loss can weight it out; evaluation pads its last
batch the same way. `valid` travels in the batch, so counting `~valid` is exact with worker processes too.

Batches are formed before the worker processes split the work (each worker makes whole batches, in
turn), so a seed gives the same batches for every `worker_count`.

Checkpointing: `iterator.get_state()` is a small JSON-able dict and `iterator.set_state(state)` resumes at
exactly the next batch. With Orbax, save it beside the train state in one composite item:

  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(iterator)))
  manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                data=grain.checkpoint.CheckpointRestore(iterator)))
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re

import grain
import jax
import numpy as np
from absl import flags, logging
from PIL import Image

from dove_jax import boxes as boxlib
from dove_jax.data import queries

# Elements read ahead are whole batches, so a few suffice (the default of 500 would hold gigabytes).
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)


def invalid_example() -> dict:
  """What an unreadable image, and an eval padding slot, becomes: a zero image with valid=False."""
  return {
      "image": np.zeros((1, 1, 3), np.uint8),
      "label": np.int32(0),
      "valid": np.bool_(False),
      "complexity": np.float32(0),
  }


def as_rgb(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W], [H, W, 1], [H, W, 3] or [H, W, 4] -> uint8 [H, W, 3] (alpha dropped)."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"expected a uint8 image [H, W, 1|3|4], got {image.dtype} {image.shape}")
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]


def decode_bytes(image_bytes: bytes) -> np.ndarray:
  """Any format Pillow reads (grayscale, RGBA and palette images too) -> uint8 [H, W, 3]."""
  with Image.open(io.BytesIO(image_bytes)) as image:
    return np.asarray(image.convert("RGB"))


def decode_image(record: dict, with_regions: bool = False) -> dict:
  """A TFDS record (decoded `image` array) or a folder record (`image_bytes`) -> {image uint8 [H, W, 3],
  label int32, valid bool, complexity float32 (0 where the source has none)}; `with_regions` keeps the
  record's descriptions and boxes for the query step. Never raises on a bad image; a bad region (an empty
  text, a box outside the image) raises ValueError naming the record, since it is the data set's bug.
  """
  where = record.get("path", "a record")
  found = queries.regions(record, where) if with_regions else None
  try:
    image = as_rgb(record["image"]) if "image" in record else decode_bytes(record["image_bytes"])
  except Exception as e:  # pylint: disable=broad-except
    # Pillow reports broken files as OSError, SyntaxError, ValueError, ...: any of them only skips the image.
    logging.warning(
        "unreadable image %s (%s: %s); it is marked valid=False", where, type(e).__name__, e
    )
    return invalid_example()
  example = {
      "image": image,
      "label": np.int32(record.get("label", 0)),
      "valid": np.bool_(True),
      "complexity": np.float32(record.get("complexity", 0)),
  }
  if found:
    example["descriptions"], example["boxes"] = found
  return example


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
  """[H, W, 3] -> shorter side `size`, aspect kept; bilinear, antialiased when shrinking (Pillow widens
  the filter by the scale factor)."""
  height, width = image.shape[:2]
  if min(height, width) == size:
    return image
  scale = size / min(height, width)
  new_size = (max(size, round(width * scale)), max(size, round(height * scale)))  # Pillow's (w, h)
  return np.asarray(Image.fromarray(image).resize(new_size, Image.Resampling.BILINEAR))


def crop(example: dict, size: int, top: int, left: int) -> dict:
  """The `size` x `size` crop at (top, left) of the (resized) image, with its boxes, if any, moved along."""
  image = example["image"]
  cropped = {**example, "image": image[top : top + size, left : left + size]}
  if "boxes" in example:
    cropped["boxes"] = boxlib.crop_boxes_np(example["boxes"], *image.shape[:2], top, left, size)
  return cropped


SIDES = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def _other_side(match: re.Match) -> str:
  word = match.group()
  other = "right" if word.lower() == "left" else "left"
  return other.upper() if word.isupper() else other.capitalize() if word[0].isupper() else other


def mirror_text(text: str | bytes) -> str | bytes:
  """A text about an image -> the same text about the mirrored image: the whole words "left" and "right"
  swapped, case kept ("the Left dog" -> "the Right dog"; "leftover" stays). bytes stay bytes (UTF-8).
  """
  if isinstance(text, bytes):
    return mirror_text(text.decode("utf-8")).encode("utf-8")
  return SIDES.sub(_other_side, text)


def flip(example: dict) -> dict:
  """Mirrors the image left-right, and its boxes and region texts with it: a query that says "the dog on the
  left" must still name the box it is paired with."""
  flipped = {**example, "image": example["image"][:, ::-1]}
  if "boxes" in example:
    flipped["boxes"] = boxlib.flip_boxes_np(example["boxes"])
  if "descriptions" in example:
    flipped["descriptions"] = [mirror_text(text) for text in example["descriptions"]]
  return flipped


@dataclasses.dataclass(frozen=True)
class TrainCrop(grain.transforms.RandomMap):
  """Shorter side to `size`, a random `size` x `size` crop, a horizontal flip half of the time."""

  size: int

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    example = {**example, "image": resize_shorter_side(example["image"], self.size)}
    height, width = example["image"].shape[:2]
    example = crop(
        example,
        self.size,
        rng.integers(height - self.size + 1),
        rng.integers(width - self.size + 1),
    )
    return flip(example) if rng.random() < 0.5 else example


@dataclasses.dataclass(frozen=True)
class CentreCrop(grain.transforms.Map):
  """Shorter side to `size`, the central `size` x `size` crop."""

  size: int

  def map(self, example: dict) -> dict:
    example = {**example, "image": resize_shorter_side(example["image"], self.size)}
    height, width = example["image"].shape[:2]
    return crop(example, self.size, (height - self.size) // 2, (width - self.size) // 2)


def to_model_input(example: dict) -> dict:
  """uint8 [S, S, 3] -> float32 in [-1, 1], the model's input range."""
  return {**example, "image": example["image"].astype(np.float32) / 127.5 - 1}


def _padding(_) -> dict:
  return invalid_example()


def make_dataset(
    source,
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    train: bool,
    num_epochs: int | None = None,
    worker_count: int = 0,
    shard_by_process: bool = True,
    query: queries.SelectQuery | None = None,
) -> grain.IterDataset:
  """Batches of this process's share of `source` (see the module doc for the keys).

  Args:
    source: a random-access source: `tfds.data_source`, `sources.ImageFolderSource`, or any sequence of
      records that `decode_image` reads.
    image_size: S, the side of the square images.
    global_batch_size: the batch over all processes; each process yields global_batch_size //
      jax.process_count() examples per batch (all of them without `shard_by_process`).
    seed: the shuffle and augmentation seed (training only).
    train: shuffled (differently each epoch), randomly cropped and flipped, repeated for `num_epochs`
      (None: forever); batches run on across epoch boundaries and only the final incomplete one is
      dropped. Otherwise one pass in order, centre crops, the last batch padded
      with valid=False examples; `num_epochs` is ignored.
    worker_count: processes that decode and augment; 0 does it in this process (same batches either way).
    shard_by_process: each JAX process reads its block of every global batch (of the shuffled order, so all
      processes together see each example once per epoch, in the order one process would).
      False: every process reads every whole batch (the same batches in each).
    query: for Q-DOVE, the step that turns each cropped example's regions into a padded query and boxes.
  """
  num_shards, shard_index = (
      (jax.process_count(), jax.process_index()) if shard_by_process else (1, 0)
  )
  if global_batch_size % num_shards:
    raise ValueError(
        f"global_batch_size={global_batch_size} is not a multiple of the {num_shards} processes"
    )
  batch_size = global_batch_size // num_shards
  examples_per_step = global_batch_size  # so that every process makes the same number of batches
  dataset = grain.MapDataset.source(source).seed(seed)
  decode = functools.partial(decode_image, with_regions=query is not None)
  if train:
    dataset = dataset.shuffle().repeat(num_epochs).map(decode).random_map(TrainCrop(image_size))
    if num_epochs is not None:
      dataset = dataset[: len(dataset) // examples_per_step * examples_per_step]
  else:
    padding = grain.MapDataset.range(-len(dataset) % examples_per_step).map(_padding)
    dataset = grain.MapDataset.concatenate([dataset.map(decode), padding]).map(
        CentreCrop(image_size)
    )
  if query is not None:
    dataset = dataset.random_map(query)
  # Process p takes the p-th block of `batch_size` consecutive examples of each global batch: the global
  # batch on the mesh is then the same images in the same order whatever the number of processes.
  dataset = dataset.map(to_model_input).batch(batch_size, drop_remainder=True)[
      shard_index::num_shards
  ]
  dataset = dataset.to_iter_dataset(READ_OPTIONS)
  if worker_count:
    if (
        not flags.FLAGS.is_parsed()
    ):  # grain's worker start-up reads absl flags, also outside an absl app
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return dataset
