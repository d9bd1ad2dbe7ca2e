"""Q-DOVE inputs: from an image's region descriptions and boxes to one padded text query per example.

A query record (the built-in set, Visual Genome) carries `descriptions` (R texts) and `boxes` [R, 4]. For each
example `SelectQuery` picks one description at random (seeded per example, so evaluation sees the same
queries every time) and keeps the boxes of every region with that same text, e.g. both "the red square"s.
It adds fixed-shape fields, so a batch stacks without Python lists:

  query_ids  int32 [Q]     the tokenized text, padded (Q = max_length; longer texts are cut)
  query_mask bool  [Q]     False on padding; all False is the empty query (the whole image is the region)
  boxes      float32 [K, 4]  (ymin, xmin, ymax, xmax) in [0, 1] of the crop the model sees, padded
  box_mask   bool  [K]

An example without regions (an unreadable image, an evaluation padding slot) or whose boxes all fall outside
the training crop gets the empty query.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from dove_jax import boxes as boxlib

QUERY_KEYS = ("query_ids", "query_mask", "boxes", "box_mask")


def _text(description) -> str:
  return description.decode("utf-8") if isinstance(description, bytes) else str(description)


def regions(record: dict, where: str) -> tuple[list[str], np.ndarray] | None:
  """A record's (descriptions, boxes [R, 4]) after checking them, or None when it has none.

  Raises ValueError naming `where` for an empty description, a count that differs from the boxes', or a box
  outside the image (`boxes.check_boxes`).
  """
  if "descriptions" not in record:
    return None
  texts = [_text(d).strip() for d in record["descriptions"]]
  region_boxes = boxlib.check_boxes(np.reshape(record["boxes"], (-1, 4)), where)
  if len(texts) != len(region_boxes):
    raise ValueError(
        f"{where}: {len(texts)} descriptions but {len(region_boxes)} boxes; they go in pairs"
    )
  empty = [i for i, text in enumerate(texts) if not text]
  if empty:
    raise ValueError(f"{where}: description {empty[0]} is empty; every box needs a text")
  return (texts, region_boxes) if texts else None


@dataclasses.dataclass(frozen=True)
class SelectQuery(grain.transforms.RandomMap):
  """Adds QUERY_KEYS to a cropped example (see the module doc); drops its `descriptions`.

  tokenizer: a `dove_jax.text` tokenizer (picklable, so it runs in grain worker processes).
  """

  tokenizer: object
  max_length: int
  max_boxes: int

  def random_map(self, example: dict, rng: np.random.Generator) -> dict:
    example = dict(example)
    texts = example.pop("descriptions", [])
    region_boxes = np.reshape(example.pop("boxes", np.zeros((0, 4), np.float32)), (-1, 4))
    usable = boxlib.nonempty(region_boxes)  # the crop may have cut some regions away
    text = ""
    chosen = np.zeros((0, 4), np.float32)
    if np.any(usable):
      text = texts[rng.choice(np.flatnonzero(usable))]
      same_text = usable & np.array([t == text for t in texts])
      chosen = region_boxes[same_text][: self.max_boxes]
    ids, mask = self.tokenizer.encode_batch([text], self.max_length)
    padded = np.zeros((self.max_boxes, 4), np.float32)
    padded[: len(chosen)] = chosen
    return {
        **example,
        "query_ids": ids[0],
        "query_mask": mask[0],
        "boxes": padded,
        "box_mask": np.arange(self.max_boxes) < len(chosen),
    }
