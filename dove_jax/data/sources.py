"""Random-access sources for the grain pipeline: TFDS data sets prepared on this machine, and image folders.

Both are grain `RandomAccessDataSource`s (`len(source)`, `source[i]`) whose records `pipeline.decode_image`
understands: TFDS records carry a decoded `image` array, folder records the file's `image_bytes`.
Nothing here downloads.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
from absl import logging

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def tfds_source(name: str, split: str, data_dir: str):
  """`split` of the TFDS data set `name` (e.g. 'imagenet2012', 'dove_shapes/64') prepared under `data_dir`
  as array_record files, as a `tfds.data_source`. Raises FileNotFoundError if it is not prepared there.
  """
  import tensorflow_datasets as tfds  # only for TFDS sets: a folder or Visual Genome run does without it

  not_prepared = FileNotFoundError(
      f"TFDS data set {name!r} (split {split!r}) is not prepared under data_dir={data_dir!r}, and this "
      f"code never downloads. Prepare it there first as array_record files, e.g. `tfds build {name} "
      f"--data_dir={data_dir} --file_format=array_record` (ImageNet also needs its archives in "
      "--manual_dir)."
  )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise not_prepared from None  # its message lists every data set TFDS knows, not the one asked for
  if not builder.is_prepared():
    raise not_prepared
  return builder.as_data_source(split=split)


def read_image_bytes(path: str) -> bytes:
  """The file's bytes, or b"" (with a warning) when it cannot be read: the pipeline then marks the example
  invalid instead of stopping training."""
  try:
    return Path(path).read_bytes()
  except OSError as e:
    logging.warning("cannot read %s: %s", path, e)
    return b""


def _class_folder(relative: Path) -> str | None:
  return relative.parts[0] if len(relative.parts) > 1 else None


class ImageFolderSource:
  """Every image under `root` (.jpg, .jpeg, .png, .webp, in nested folders too), sorted by path.

  The label is the index of the image's top-level folder among the sorted top-level folder names (`classes`),
  as in ImageNet's `train/n01440764/*.JPEG` layout; a flat folder has label 0 everywhere and no classes.
  Records are {"image_bytes": bytes, "path": str, "label": int}; a file that cannot be read gives empty
  bytes, which the decode step turns into an invalid example instead of stopping training.
  """

  def __init__(self, root: str | Path):
    root = Path(root)
    relative_paths = sorted(
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if not relative_paths:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    class_folders = [_class_folder(p) for p in relative_paths]
    if None in class_folders and any(class_folders):
      loose = relative_paths[class_folders.index(None)]
      raise ValueError(
          f"{root} has class subfolders but also images directly inside it (e.g. {loose}); "
          "move them into a subfolder so every image has a class"
      )
    self.root = root
    self.classes = sorted(set(class_folders) - {None})
    class_index = {name: index for index, name in enumerate(self.classes)}
    self.relative_paths = [p.as_posix() for p in relative_paths]
    self._labels = np.array([class_index.get(c, 0) for c in class_folders], np.int64)

  def __len__(self) -> int:
    return len(self.relative_paths)

  def __getitem__(self, index: int) -> dict:
    path = str(self.root / self.relative_paths[index])
    return {"image_bytes": read_image_bytes(path), "path": path, "label": int(self._labels[index])}

  def labels(self) -> np.ndarray:
    """[N] every image's label, without reading any file."""
    return self._labels.copy()

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={str(self.root)!r}, images={len(self)}, classes={len(self.classes)})"


class Subset:
  """Records `indices` of a random-access source, as a source of its own, with its `classes`."""

  def __init__(self, source, indices: Sequence[int]):
    self.source, self.indices = source, indices
    self.classes = class_names(source)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {self!r}")
    return self.source[int(self.indices[index])]

  def labels(self) -> np.ndarray:
    """[N] the label of every record (`record_labels`)."""
    return record_labels(self.source)[np.asarray(self.indices, np.int64)]

  def __repr__(self) -> str:
    return f"Subset({self.source!r}, {len(self)} records)"


class ClassSubset(Subset):
  """The records of the classes `class_ids` of a source, relabelled 0..K-1 in the order of `class_ids`
  (so a K-way classifier can be fitted on them); `classes` are their names."""

  def __init__(self, source, class_ids: Sequence[int]):
    labels = record_labels(source)  # [N]
    super().__init__(source, np.flatnonzero(np.isin(labels, class_ids)))
    names = class_names(source)
    self.classes = [names[i] if names else str(i) for i in class_ids]
    new_label = np.full(max(labels.max(initial=0), *class_ids) + 1, -1, np.int64)  # old id -> new
    new_label[list(class_ids)] = np.arange(len(class_ids))
    self._labels = new_label[labels[self.indices]]  # [M]

  def __getitem__(self, index: int) -> dict:
    return {**super().__getitem__(index), "label": int(self._labels[index])}

  def labels(self) -> np.ndarray:
    return self._labels.copy()


def class_names(source) -> list[str] | None:
  """The names of a source's labels 0..K-1: a TFDS ClassLabel's names, an image folder's class folders;
  None where the source does not name them."""
  if hasattr(source, "classes"):
    return source.classes
  info = getattr(source, "dataset_info", None)
  if info is not None and "label" in info.features:
    return list(info.features["label"].names)
  return None


def record_labels(source) -> np.ndarray:
  """[N] the label of every record (0 where a record has none), without decoding images: a TFDS source is
  read again with its image features left as bytes (~40 us a record)."""
  if hasattr(source, "labels"):
    return source.labels()
  info = getattr(source, "dataset_info", None)
  if info is not None:
    import tensorflow_datasets as tfds

    undecoded = {
        name: tfds.decode.SkipDecoding()
        for name, feature in info.features.items()
        if isinstance(feature, tfds.features.Image)
    }
    source = type(source)(dataset_info=info, split=source.split, decoders=undecoded)
  return np.array([record.get("label", 0) for record in source], np.int64)


def read_class_list(path: str | Path) -> list[str]:
  """The entries of a class list file: one class name or integer id a line; blank lines and text after a
  '#' are ignored."""
  entries = [line.split("#", 1)[0].strip() for line in Path(path).read_text().splitlines()]
  return [entry for entry in entries if entry]


def class_ids(entries: Sequence[str], names: Sequence[str] | None, where: str) -> list[int]:
  """Class list entries -> label ids: a class name of `names`, or an id 0..len(names)-1 (any id >= 0 where
  the classes have no names). Raises ValueError naming `where` (the list's file) and the first entry that
  is neither, or is listed twice."""
  index = {name: i for i, name in enumerate(names or ())}
  ids = []
  for entry in entries:
    if entry in index:
      ids.append(index[entry])
    elif entry.isdigit() and (names is None or int(entry) < len(names)):
      ids.append(int(entry))
    else:
      known = (
          f"one of its {len(names)} class names (e.g. {names[0]!r}) or an id below {len(names)}"
          if names
          else "a class id (the data set names no classes)"
      )
      raise ValueError(f"{where}: unknown class {entry!r}; expected {known}")
    if ids[-1] in ids[:-1]:
      raise ValueError(f"{where}: class {entry!r} is listed twice")
  if not ids:
    raise ValueError(f"{where}: lists no class")
  return ids


def class_subset(source, path: str | Path) -> ClassSubset:
  """The records of the classes listed in the file `path` (`read_class_list`), relabelled 0..K-1 in the
  list's order; e.g. configs/imagenet100.txt on imagenet2012. Raises ValueError naming the file and any
  entry that is not a class of `source`."""
  return ClassSubset(
      source, class_ids(read_class_list(path), class_names(source) or None, str(path))
  )


def split_off(source, eval_size: int) -> tuple[Subset, Subset]:
  """(train, eval): the last `eval_size` records are held out for evaluation (for a set with one split)."""
  if not 0 < eval_size < len(source):
    raise ValueError(
        f"config.data.eval_size = {eval_size}; expected 1..{len(source) - 1} for {source!r}"
    )
  cut = len(source) - eval_size
  return Subset(source, range(cut)), Subset(source, range(cut, len(source)))


def held_out(relative_path: str, eval_fraction: float) -> bool:
  """Whether an image belongs to a folder's held-out part: the first 8 bytes of the SHA-256 of its relative
  path (POSIX separators), read as a fraction of 2^64, fall below `eval_fraction`. Depends on nothing but the
  path, so every run and machine splits a folder alike, and adding images never moves the others."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def folder_split(folder: ImageFolderSource, eval_fraction: float) -> tuple[Subset, Subset]:
  """(train, eval) parts of an image folder, disjoint and together the whole folder: about `eval_fraction`
  of the images are held out (`held_out`). 1 holds out every image (a folder only evaluated, never trained
  on). Raises ValueError for a fraction outside (0, 1] or an empty held-out part."""
  if not 0 < eval_fraction <= 1:
    raise ValueError(f"config.data.eval_fraction = {eval_fraction}; expected a fraction in (0, 1]")
  is_eval = np.array([held_out(path, eval_fraction) for path in folder.relative_paths], bool)
  if not is_eval.any():
    raise ValueError(
        f"no image of {folder!r} falls in the held-out {eval_fraction:.1%}; raise "
        "config.data.eval_fraction"
    )
  return Subset(folder, np.flatnonzero(~is_eval)), Subset(folder, np.flatnonzero(is_eval))
