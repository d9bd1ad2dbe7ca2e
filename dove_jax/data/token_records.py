"""Pre-tokenized data sets (`python -m dove_jax.tokenize`): the record format, a reader, and fixed-shape
batches for a model that reads the tokens (padded to a bucket, or packed into windows).

  records = read_tokens("tokens/shapes")  # records[i]: tokens [length, D], length, eos_prob, index, id, label
  padded = grain.MapDataset.source(records).batch(
      32, batch_fn=functools.partial(pad_to_bucket, max_tokens=records.max_tokens, bucket_sizes=(16, 32)))
  windows = pack(grain.MapDataset.source(records).shuffle(seed=0).to_iter_dataset(), window=1024)
  # windows: tokens [1024, D], segment_ids, positions [1024] (as an LLM trainer packs text), index, label

A tokenized folder holds ArrayRecord shards and manifest.json (the model, the settings, each shard's state
and image range, the skipped images). Each record of a shard is one image, a msgpack map:

  index     int: the image's position in the source (the i-th record of a TFDS split, the i-th path of
            the folder in sorted order)
  id        int (the index) or str (the path relative to the folder)
  label     int, or nil where the source has no labels
  length    int L, the number of tokens kept (1..max_tokens)
  tokens    bin: L x D values of the manifest's `dtype` (float32, bfloat16 or float16), row-major [L, D],
            little-endian; exactly what the model gave (float32) or its round-to-nearest-even cast. Nothing
            after the length is stored.
  eos_prob  bin: max_tokens float32 values, little-endian: every slot's EOS probability, so that the
            length at another threshold can be read off later.

Any msgpack library reads them (D, max_tokens and dtype are in the manifest). Records are in image order;
a skipped (unreadable) image has none and is listed in the manifest.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Sequence

import grain
import ml_dtypes
import msgpack
import numpy as np

FORMAT = "dove-jax-tokens/1"
MANIFEST = "manifest.json"
SUMMARY = "lengths.json"
STORAGE_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
NO_LABEL = -1  # in batches and windows: a source without labels, or a padding slot


def encode_record(
    index: int, id_: int | str, label: int | None, tokens: np.ndarray, eos_prob: np.ndarray
) -> bytes:
  """One image's record: tokens [L, D] already at its length and storage dtype, eos_prob [max_tokens]."""
  return msgpack.packb(
      {
          "index": int(index),
          "id": id_,
          "label": None if label is None else int(label),
          "length": len(tokens),
          "tokens": np.ascontiguousarray(tokens, tokens.dtype.newbyteorder("<")).tobytes(),
          "eos_prob": np.ascontiguousarray(eos_prob, "<f4").tobytes(),
      }
  )


def decode_record(data: bytes, token_dim: int, dtype: np.dtype) -> dict:
  """A record's bytes -> {index, id, label, length, tokens [L, D] of `dtype`, eos_prob [max_tokens]}."""
  record = msgpack.unpackb(data)
  record["tokens"] = np.frombuffer(record["tokens"], dtype.newbyteorder("<")).reshape(
      record["length"], token_dim
  )
  record["eos_prob"] = np.frombuffer(record["eos_prob"], "<f4")
  return record


def shard_name(index: int, count: int, process: int) -> str:
  """The file of shard `index` of `count`, written by process `process`."""
  return f"tokens-{index:05d}-of-{count:05d}.process-{process:03d}.array_record"


def write_json(path: Path, value) -> None:
  """Writes `path` atomically: a reader (or a killed run's successor) sees the old file or the new one,
  also when several processes write it."""
  temporary = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")  # its own, whoever else writes
  temporary.write_text(json.dumps(value, indent=1) + "\n")
  os.replace(temporary, path)


def read_manifest(directory: str | Path) -> dict:
  """manifest.json of a finished `python -m dove_jax.tokenize` output folder. Raises FileNotFoundError
  (none there) or ValueError (another format, or shards not done: the run was interrupted)."""
  path = Path(directory).expanduser() / MANIFEST
  if not path.is_file():
    raise FileNotFoundError(
        f"{path} not found: not a tokenized folder, or its processes have not all finished"
    )
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT:
    raise ValueError(f"{path} is format {manifest.get('format')!r}; this reader reads {FORMAT!r}")
  pending = [shard["file"] for shard in manifest["shards"] if shard["state"] != "done"]
  if pending:
    raise ValueError(
        f"{directory}: {len(pending)} of {len(manifest['shards'])} shards are not done (e.g. "
        f"{pending[0]}); re-run the tokenize command to finish them"
    )
  return manifest


class TokenRecords:
  """A grain random-access source over a tokenized folder's records, in image order (`len`, `[i]`).

  Attributes: manifest (the folder's manifest.json), token_dim (D), max_tokens, dtype (the storage dtype).
  """

  def __init__(self, directory: str | Path):
    self.directory = Path(directory).expanduser()
    self.manifest = read_manifest(self.directory)
    self.token_dim = self.manifest["token_dim"]
    self.max_tokens = self.manifest["model"]["arguments"]["max_tokens"]
    self.dtype = STORAGE_DTYPES[self.manifest["settings"]["dtype"]]
    files = [str(self.directory / s["file"]) for s in self.manifest["shards"] if s["records"]]
    self._source = grain.sources.ArrayRecordDataSource(files) if files else []

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return decode_record(self._source[index], self.token_dim, self.dtype)

  def __repr__(self) -> str:
    return f"TokenRecords({str(self.directory)!r}, records={len(self)}, D={self.token_dim})"


def read_tokens(directory: str | Path) -> TokenRecords:
  """The records of a tokenized folder (`TokenRecords`): records[i]["tokens"] is [length, D]."""
  return TokenRecords(directory)


def pad_to_bucket(
    records: Sequence[dict], max_tokens: int, bucket_sizes: Sequence[int] = ()
) -> dict[str, np.ndarray]:
  """Records -> one fixed-shape batch, padded to the smallest of `bucket_sizes` that holds the longest
  sequence (else to `max_tokens`), so that a consumer compiles once per bucket. Use it as a grain
  `batch_fn` (with functools.partial).

  Returns tokens [B, T, D] (zero after each length), mask [B, T] (True on real tokens), length [B] int32,
  eos_prob [B, max_tokens], index [B] int64, label [B] int64 (NO_LABEL where none), id [B] (ints or str).
  """
  longest = max(record["length"] for record in records)
  size = min((s for s in bucket_sizes if s >= longest), default=max_tokens)
  first = records[0]["tokens"]
  tokens = np.zeros((len(records), size, first.shape[1]), first.dtype)  # [B, T, D]
  for row, record in enumerate(records):
    tokens[row, : record["length"]] = record["tokens"]
  lengths = np.array([record["length"] for record in records], np.int32)  # [B]
  return {
      "tokens": tokens,
      "mask": np.arange(size)[None, :] < lengths[:, None],  # [B, T]
      "length": lengths,
      "eos_prob": np.stack([record["eos_prob"] for record in records]),  # [B, max_tokens]
      "index": np.array([record["index"] for record in records], np.int64),
      "label": np.array([_label(record) for record in records], np.int64),
      "id": np.array([record["id"] for record in records]),
  }


def _label(record: dict) -> int:
  return NO_LABEL if record["label"] is None else record["label"]


def _packable(record: dict, window: int) -> dict:
  # The packer needs every sequence to fit its window; a longer one keeps its first `window` tokens.
  return {
      "tokens": record["tokens"][:window],  # [L, D]
      "index": np.array([record["index"]], np.int64),  # [1]: one entry per segment
      "label": np.array([_label(record)], np.int64),
  }


def _renamed(packed: dict) -> dict:
  return {
      "tokens": packed["tokens"],
      "segment_ids": packed["tokens_segment_ids"],
      "positions": packed["tokens_positions"],
      "index": packed["index"],
      "label": packed["label"],
  }


def pack(
    records: grain.IterDataset,
    window: int,
    *,
    max_segments: int | None = None,
    num_bins: int = 16,
    shuffle_bins: bool = False,
    seed: int = 0,
) -> grain.IterDataset:
  """Packs variable-length token sequences into fixed windows of `window` tokens, as an LLM trainer packs
  text (grain's first-fit packer over `num_bins` open windows: no sequence is split, the rest is padding).

  Args:
    records: an IterDataset of records (e.g. `MapDataset.source(read_tokens(...)).to_iter_dataset()`).
    window: W, the tokens of a window; a longer sequence keeps its first W tokens.
    max_segments: S, the most sequences a window holds (default W).
    num_bins: windows filled at once; more pack tighter and hold more records in memory.
    shuffle_bins, seed: shuffle each group of `num_bins` finished windows.

  Returns windows {tokens [W, D] (zero on padding), segment_ids [W] int32 (1, 2, ... the sequence a token
  belongs to, 0 = padding), positions [W] int32 (0-based within its sequence), index [S] int64 and label
  [S] int64 of segment s + 1 (-1 past the last segment)}: every array of a fixed shape, so windows batch.
  """
  max_segments = max_segments or window
  return grain.experimental.FirstFitPackIterDataset(
      records.map(lambda record: _packable(record, window)),
      length_struct={"tokens": window, "index": max_segments, "label": max_segments},
      num_packing_bins=num_bins,
      shuffle_bins=shuffle_bins,
      seed=seed,
      max_sequences_per_bin=max_segments,
      padding_struct={"tokens": 0, "index": -1, "label": NO_LABEL},
  ).map(_renamed)


def unpack(window: dict) -> list[np.ndarray]:
  """A packed window -> its sequences [L_s, D], in segment order (the inverse of `pack` on one window)."""
  segment_ids = window["segment_ids"]
  return [window["tokens"][segment_ids == s] for s in range(1, int(segment_ids.max(initial=0)) + 1)]
