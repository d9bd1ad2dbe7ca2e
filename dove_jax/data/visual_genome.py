"""Visual Genome region descriptions on local disk, as a random-access source for Q-DOVE training.

Q-DOVE fine-tunes on text queries with the boxes they describe (DOVE.md, Q-DOVE section); Visual Genome's
region descriptions are such pairs. Expected layout (as the VG downloads unpack):

  root/region_descriptions.json   [{"id": image_id, "regions": [{"region_id", "image_id", "phrase",
                                                                 "x", "y", "width", "height"}, ...]}, ...]
  root/image_data.json            optional: [{"image_id" (or "id"), "width", "height", ...}, ...]
  root/VG_100K/{image_id}.jpg, root/VG_100K_2/{image_id}.jpg, or root/images/{image_id}.jpg

Records, one per image with at least one usable region, in the order of region_descriptions.json:
  {"image_bytes": bytes, "path": str, "label": 0,
   "descriptions": list[str] (the phrases, stripped),
   "boxes": float32 [R, 4], (ymin, xmin, ymax, xmax) in [0, 1], divided by the image's width and height}

Image sizes come from image_data.json for the images it lists (those files are not opened), else from
each file's header (Pillow reads the size without decoding). Bad regions are skipped and counted in
`skipped` by reason (and logged once); `strict=True` raises instead. A file that cannot be read when a
record is read gives empty `image_bytes`, which the decode step turns into an invalid example instead of
stopping training.

The JSON is parsed once (for all of VG, 108k images and 5.4M regions, that takes several GB for a while);
what is kept is compact: per-region boxes in one array and the phrases in one UTF-8 buffer, so the source
stays small and pickles quickly to grain's worker processes. Nothing here downloads.
"""

from __future__ import annotations

import array
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import logging
from PIL import Image

from dove_jax.data.sources import read_image_bytes

DEFAULT_IMAGE_DIRS = ("VG_100K", "VG_100K_2", "images")
# VG boxes often overhang the image by a pixel: clip those, skip worse ones.
OVERHANG_PIXELS = 1.0
# What `skipped` counts: the first three are regions, the last three images.
SKIP_REASONS = (
    "empty_phrase",
    "nonpositive_size",
    "outside_image",
    "missing_file",
    "unreadable_file",
    "no_usable_regions",
)


class _BadRegion(Exception):
  """A region that cannot be used; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def _read_json(path: Path) -> list[dict]:
  with path.open("rb") as f:
    return json.load(f)


def _image_id(entry: dict, file: str) -> int:
  """VG entries name the image "id" in some files and versions, "image_id" in others."""
  image_id = entry.get("image_id", entry.get("id"))
  if image_id is None:
    raise ValueError(f"{file}: an entry has neither 'image_id' nor 'id' (keys: {sorted(entry)})")
  return int(image_id)


def _sizes_from_image_data(path: Path) -> dict[int, tuple[int, int]]:
  """image_data.json -> {image_id: (width, height)}."""
  sizes = {}
  for entry in _read_json(path):
    image_id = _image_id(entry, path.name)
    try:
      sizes[image_id] = int(entry["width"]), int(entry["height"])
    except KeyError as e:
      raise ValueError(
          f"{path}: image {image_id} has no {e}; each entry needs width and height (or remove "
          "the file to read sizes from the images)"
      ) from None
  return sizes


def _index_image_files(folders: Sequence[Path]) -> dict[int, str]:
  """{image_id: path} of every {image_id}.jpg in `folders`; where two folders hold an id, the first wins.

  One listing per folder: much faster than probing 108k paths in each folder."""
  paths = {}
  for folder in reversed(folders):
    with os.scandir(folder) as entries:
      for entry in entries:
        stem, suffix = os.path.splitext(entry.name)
        if suffix.lower() == ".jpg" and stem.isdigit():
          paths[int(stem)] = entry.path
  return paths


def _starts(lengths: Sequence[int]) -> np.ndarray:
  """int64 [n + 1]: where each of n consecutive pieces of these lengths starts, then the total."""
  return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])


def _normalized_box(region: dict, width: int, height: int) -> tuple[float, float, float, float]:
  """A region's pixel box (x, y, width, height) -> (ymin, xmin, ymax, xmax) in [0, 1], clipped to the
  image. Raises _BadRegion for a box without area or one that overhangs by more than OVERHANG_PIXELS.
  """
  x, y, w, h = (float(region[key]) for key in ("x", "y", "width", "height"))
  for field, value in (("width", w), ("height", h)):
    if value <= 0:
      raise _BadRegion("nonpositive_size", f"{field} = {value:g} is not positive")
  for field, value, low, high in (
      ("x", x, 0, width),
      ("y", y, 0, height),
      ("x + width", x + w, 0, width),
      ("y + height", y + h, 0, height),
  ):
    if not low - OVERHANG_PIXELS <= value <= high + OVERHANG_PIXELS:
      raise _BadRegion(
          "outside_image",
          f"{field} = {value:g} is outside the image's [{low}, {high}] by more "
          f"than {OVERHANG_PIXELS:g} pixel ({width}x{height} image)",
      )
  xmin, xmax = max(x, 0), min(x + w, width)
  ymin, ymax = max(y, 0), min(y + h, height)
  if (
      xmax <= xmin or ymax <= ymin
  ):  # e.g. x = width + 0.5: within the tolerance, but nothing is left
    raise _BadRegion(
        "outside_image",
        f"the box x={x:g}, y={y:g}, width={w:g}, height={h:g} has no area "
        f"inside the {width}x{height} image",
    )
  return ymin / height, xmin / width, ymax / height, xmax / width


def _phrase(region: dict) -> str:
  phrase = (region.get("phrase") or "").strip()
  if not phrase:
    raise _BadRegion("empty_phrase", f"phrase = {region.get('phrase')!r} is empty")
  return phrase


class VisualGenomeSource:
  """Visual Genome images with their region descriptions and boxes (see the module doc for the records).

  Args:
    root: the folder holding region_descriptions.json (and optionally image_data.json).
    image_dirs: folders searched for {image_id}.jpg, in order, relative to `root` (or absolute); the
      default is VG_100K, VG_100K_2, images. Those that do not exist are passed over; one must exist.
    max_regions_per_image: keep an image's first this many usable regions (None: all).
    limit: keep only the first this many usable images (None: all), for quick runs.
    strict: raise on a bad region or a missing image file instead of skipping it.
  """

  def __init__(
      self,
      root: str | Path,
      image_dirs: Sequence[str | Path] | None = None,
      max_regions_per_image: int | None = None,
      limit: int | None = None,
      strict: bool = False,
  ):
    root = Path(root)
    for name, value in (("max_regions_per_image", max_regions_per_image), ("limit", limit)):
      if value is not None and value < 1:
        raise ValueError(f"{name} must be at least 1 (or None for all), got {value}")
    regions_file = root / "region_descriptions.json"
    if not regions_file.is_file():
      raise FileNotFoundError(
          f"no {regions_file}: expected Visual Genome's region_descriptions.json there, "
          "with the images in VG_100K/ and VG_100K_2/ (or images/) beside it; nothing is "
          "downloaded, so unpack the Visual Genome files there first"
      )
    folders = [root / d for d in (image_dirs or DEFAULT_IMAGE_DIRS)]
    existing = [f for f in folders if f.is_dir()]
    if not existing:
      raise FileNotFoundError(
          f"none of the image folders {', '.join(map(str, folders))} exists; put the "
          "images there or pass image_dirs"
      )
    image_data_file = root / "image_data.json"
    sizes = _sizes_from_image_data(image_data_file) if image_data_file.is_file() else {}

    self.root = root
    self.strict = strict
    self.skipped = dict.fromkeys(SKIP_REASONS, 0)
    self._paths, region_counts, boxes, phrases = self._parse(
        _read_json(regions_file), _index_image_files(existing), sizes, max_regions_per_image, limit
    )
    self._region_starts = _starts(region_counts)
    self._boxes = np.array(boxes, np.float32).reshape(-1, 4)
    self._phrase_starts = _starts([len(p) for p in phrases])
    self._phrase_buffer = b"".join(phrases)
    if any(self.skipped.values()):
      logging.warning(
          "Visual Genome under %s: skipped %s",
          root,
          ", ".join(f"{count} {reason}" for reason, count in self.skipped.items() if count),
      )

  def _parse(
      self,
      entries: list[dict],
      paths: dict[int, str],
      sizes: dict[int, tuple[int, int]],
      max_regions: int | None,
      limit: int | None,
  ) -> tuple[list[str], list[int], array.array, list[bytes]]:
    """region_descriptions.json's `entries` -> the kept images' paths and region counts, and their regions'
    boxes (flat float32) and UTF-8 phrases; counts what it skips."""
    image_paths, region_counts, phrases = [], [], []
    boxes = array.array("f")  # 16 bytes a region instead of a tuple of 4 Python floats (~180)
    for entry in entries:
      if limit is not None and len(image_paths) == limit:
        break
      image_id = _image_id(entry, "region_descriptions.json")
      path = paths.get(image_id)
      if path is None:
        if self.strict:
          raise FileNotFoundError(
              f"Visual Genome image {image_id}: no {image_id}.jpg in the image folders "
              f"under {self.root}"
          )
        self.skipped["missing_file"] += 1
        continue
      size = sizes.get(image_id) or self._size_from_header(image_id, path)
      if size is None:
        self.skipped["unreadable_file"] += 1
        continue
      kept = self._usable_regions(image_id, entry.get("regions", []), size)[:max_regions]
      if not kept:
        self.skipped["no_usable_regions"] += 1
        continue
      image_paths.append(path)
      region_counts.append(len(kept))
      for box, phrase in kept:
        boxes.extend(box)
        phrases.append(phrase.encode("utf-8"))
    return image_paths, region_counts, boxes, phrases

  def _size_from_header(self, image_id: int, path: str) -> tuple[int, int] | None:
    """(width, height) from the file's header (no decoding); None (or an error when strict) if unreadable."""
    try:
      with Image.open(path) as image:
        return image.size
    except Exception as e:  # pylint: disable=broad-except  # Pillow reports broken files in many types
      if self.strict:
        raise ValueError(
            f"Visual Genome image {image_id}: cannot read the size of {path} "
            f"({type(e).__name__}: {e})"
        ) from e
      logging.warning(
          "cannot read the size of %s (%s: %s); image %d is skipped",
          path,
          type(e).__name__,
          e,
          image_id,
      )
      return None

  def _usable_regions(
      self, image_id: int, regions: list[dict], size: tuple[int, int]
  ) -> list[tuple[tuple[float, ...], str]]:
    """[(normalized box, phrase)] of the good regions; bad ones are counted, or raise when strict."""
    usable = []
    for region in regions:
      region_id = region.get("region_id", "?")
      try:
        phrase = _phrase(region)
        usable.append((_normalized_box(region, *size), phrase))
      except _BadRegion as e:
        if self.strict:
          raise ValueError(
              f"Visual Genome image {image_id}, region {region_id}: {e} (strict=True; "
              "strict=False skips such regions)"
          ) from e
        self.skipped[e.reason] += 1
      except KeyError as e:  # a file in another format, not a bad region: always an error
        raise ValueError(
            f"region_descriptions.json: image {image_id}, region {region_id} has no field {e}; "
            "expected phrase, x, y, width and height"
        ) from None
    return usable

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    index = range(len(self))[index]  # negative indices too, and IndexError past the end
    path = self._paths[index]
    image_bytes = read_image_bytes(path)
    start, end = self._region_starts[index], self._region_starts[index + 1]
    phrase_starts = self._phrase_starts[start : end + 1]
    descriptions = [
        self._phrase_buffer[a:b].decode("utf-8")
        for a, b in zip(phrase_starts[:-1], phrase_starts[1:])
    ]
    return {
        "image_bytes": image_bytes,
        "path": path,
        "label": 0,
        "descriptions": descriptions,
        "boxes": self._boxes[start:end].copy(),
    }

  def __repr__(self) -> str:
    return f"VisualGenomeSource(root={str(self.root)!r}, images={len(self)}, regions={len(self._boxes)})"
