"""Random-access sources for the grain pipeline: TFDS data sets prepared on this machine, and image folders.

Both are grain `RandomAccessDataSource`s (`len(source)`, `source[i]`) whose records `pipeline.decode_image`
understands: TFDS records carry a decoded `image` array, folder records the file's `image_bytes`.
Nothing here downloads.
"""
from __future__ import annotations

from pathlib import Path

from absl import logging

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def tfds_source(name: str, split: str, data_dir: str):
  """`split` of the TFDS data set `name` (e.g. 'imagenet2012', 'dove_shapes/64') prepared under `data_dir`
  as array_record files, as a `tfds.data_source`. Raises FileNotFoundError if it is not prepared there."""
  import tensorflow_datasets as tfds  # only for TFDS sets: a folder or Visual Genome run does without it
  not_prepared = FileNotFoundError(
      f"TFDS data set {name!r} (split {split!r}) is not prepared under data_dir={data_dir!r}, and this "
      f"code never downloads. Prepare it there first as array_record files, e.g. `tfds build {name} "
      f"--data_dir={data_dir} --file_format=array_record` (ImageNet also needs its archives in "
      "--manual_dir).")
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

  The label is the index of the image's top-level folder among the sorted top-level folder names, as in
  ImageNet's `train/n01440764/*.JPEG` layout; a flat folder has label 0 everywhere. Records are
  {"image_bytes": bytes, "path": str, "label": int}; a file that cannot be read gives empty bytes, which
  the decode step turns into an invalid example instead of stopping training.
  """

  def __init__(self, root: str | Path):
    root = Path(root)
    relative_paths = sorted(p.relative_to(root) for p in root.rglob("*")
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not relative_paths:
      raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    class_folders = [_class_folder(p) for p in relative_paths]
    if None in class_folders and any(class_folders):
      loose = relative_paths[class_folders.index(None)]
      raise ValueError(f"{root} has class subfolders but also images directly inside it (e.g. {loose}); "
                       "move them into a subfolder so every image has a class")
    self.root = root
    self.classes = sorted(set(class_folders) - {None})
    class_index = {name: index for index, name in enumerate(self.classes)}
    self._paths = [str(root / p) for p in relative_paths]
    self._labels = [class_index.get(c, 0) for c in class_folders]

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    path = self._paths[index]
    return {"image_bytes": read_image_bytes(path), "path": path, "label": self._labels[index]}

  def __repr__(self) -> str:
    return f"ImageFolderSource(root={str(self.root)!r}, images={len(self)}, classes={len(self.classes)})"


class Slice:
  """Records start..stop of a random-access source, as a source of its own."""

  def __init__(self, source, start: int, stop: int):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {self!r}")
    return self.source[self.start + index]

  def __repr__(self) -> str:
    return f"Slice({self.source!r}, {self.start}, {self.stop})"


def split_off(source, eval_size: int) -> tuple[Slice, Slice]:
  """(train, eval): the last `eval_size` records are held out for evaluation (for a set with one split)."""
  if not 0 < eval_size < len(source):
    raise ValueError(f"config.data.eval_size = {eval_size}; expected 1..{len(source) - 1} for {source!r}")
  cut = len(source) - eval_size
  return Slice(source, 0, cut), Slice(source, cut, len(source))
