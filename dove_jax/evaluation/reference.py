"""The real images' Inception statistics for rFID, cached in the run's workdir: evaluating ten checkpoints
runs Inception over the real images once.

Each cache file is named by the SHA-256 of its key and holds the key beside the statistics; the key is
everything the statistics depend on (`reference_key`), so a change of data, part, classes, image count,
size, 8-bit convention or Inception weights is stored anew, and a file whose stored key is not the one asked
for is refused, never read. The data files themselves are assumed not to change: after editing a data set in
place, delete `workdir/reference_statistics`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

import jax.numpy as jnp
import numpy as np

from dove_jax import mesh as meshlib
from dove_jax.evaluation import fid, metrics

DIRECTORY = "reference_statistics"  # under the workdir


def file_sha256(path: str | Path) -> str:
  with open(path, "rb") as file:
    return hashlib.file_digest(file, "sha256").hexdigest()


def reference_key(
    data: dict, images: int, image_size: int, uint8: bool, inception: str | Path
) -> dict:
  """What the real images' statistics depend on: `data`, what was evaluated (data set, part, classes and
  record count, `run.describe_data`); how many of its records (`images`, as padded batches cut them); their
  size (centre crops); the 8-bit convention; the Inception weights file's SHA-256."""
  return {
      "data": data,
      "images": images,
      "image_size": image_size,
      "crop": "centre",
      "uint8": uint8,
      "inception_sha256": file_sha256(inception),
  }


def real_statistics(inception: fid.InceptionV3, data: Iterable[dict]) -> metrics.FeatureStatistics:
  """Inception pool features of the valid images of `data` (batches, their images on the devices or on
  the host), as streaming statistics."""
  stats = metrics.FeatureStatistics()
  for batch in data:
    keep = np.asarray(batch["valid"])
    features = fid.inception_features(inception, jnp.asarray(batch["image"]))  # [B, 2048]
    stats.update(meshlib.to_host(features)[keep])
  return stats


def reference_statistics(
    directory: str | Path, key: dict, inception: fid.InceptionV3, data: Iterable[dict]
) -> tuple[metrics.FeatureStatistics, Path, bool]:
  """(statistics, cache file, whether it was reused): the real images' statistics from the cache file of
  `key` in `directory`, or computed from `data` (batches) and stored there.

  Raises ValueError if the file holds the statistics of another key.
  """
  canonical = json.dumps(key, sort_keys=True)
  path = Path(directory) / f"{hashlib.sha256(canonical.encode()).hexdigest()[:20]}.npz"
  if path.is_file():
    with np.load(path) as stored:
      if str(stored["key"]) != canonical:
        raise ValueError(
            f"{path} holds the reference statistics of {stored['key']}, not of {canonical}; "
            "delete it to compute them again"
        )
      return metrics.FeatureStatistics.from_state_dict(stored), path, True
  stats = real_statistics(inception, data)
  path.parent.mkdir(parents=True, exist_ok=True)
  partial = path.with_suffix(
      f".{os.getpid()}.partial"
  )  # its own: several processes may write at once
  with open(partial, "wb") as file:
    np.savez(file, key=np.asarray(canonical), **stats.state_dict())
  os.replace(
      partial, path
  )  # whole or absent: an interrupted evaluation leaves no half-written cache
  return stats, path, False
