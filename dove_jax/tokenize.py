"""Pre-tokenizes a data set with a DOVE: every image's tokens at its own length, in ArrayRecord shards that
a model reading DOVE tokens trains on without running DOVE (`dove_jax.data.token_records` reads them).

  python -m dove_jax.tokenize --model models/tiny --source builtin --split eval --out tokens/shapes
  python -m dove_jax.tokenize --model models/dove --source folder --folder ~/photos --out tokens/photos \\
      --dtype bfloat16
  python -m dove_jax.tokenize --model models/dove --source tfds --name imagenet2012 --split validation \\
      --data_dir ~/tensorflow_datasets --out tokens/imagenet-val --budget 64

--model is a `save_pretrained` folder. Images get evaluation's centre crop at the model's image_size. OUT
gets the shards, manifest.json (the model folder, hashes of its two files, its arguments, the settings,
each shard's state and image range, the skipped images) and a summary: lengths.json, lengths.png and one
printed line. Reading, encoding and writing overlap: grain decodes ahead in threads, the encoder runs
asynchronously, and a writer thread turns finished batches into records.

Resuming: a shard is written under a temporary name, renamed once closed, and only then marked done in the
manifest; re-running the same command after a crash (kill -9 too) redoes only the shards not done, so every
image is in exactly one record. An OUT written by another model or with other settings is refused, naming
what differs. An unreadable image is skipped and listed in the manifest.

Several processes (or machines): the same command on each, with jax.distributed initialised from the
environment as train.py does (a coordinator address, SLURM, Open MPI), or with --process_index i
--process_count P (by default jax.process_index() and jax.process_count()). Process i writes shards i, i + P, ... and its own manifest
(manifest.process-i-of-P.json); whichever finishes last merges them into manifest.json and writes the
summary. Within a process the batch is split over its local devices.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import sys
import uuid
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from array_record.python import array_record_module
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from dove_jax import console, distributed, weights, xla
from dove_jax.data import pipeline, sources
from dove_jax.data.token_records import (
    FORMAT,
    MANIFEST,
    STORAGE_DTYPES,
    SUMMARY,
    encode_record,
    shard_name,
    write_json,
)
from dove_jax.models.dove import DOVE

# Tokens are float noise to a compressor; uncompressed, one record a group, reads are one seek each.
WRITER_OPTIONS = "group_size:1,uncompressed"
# Encoded batches waiting for the writer thread, so that the encoder never waits on a write.
BATCHES_AHEAD = 2
BUILTIN_SIZES = (64, 256)  # the built-in data set's configs
PERCENTILES = (5, 25, 50, 75, 95)


@dataclasses.dataclass(frozen=True)
class Settings:
  """What decides the records: a resumed run must use the same (batch size and workers do not count).

  Attributes:
    budget: every image's forced length; 0 = the model's predicted length.
    eos_threshold: overrides the model's (None: the model's own).
    dtype: the storage dtype of the tokens: float32, bfloat16 or float16.
    images_per_shard: consecutive images per shard (the unit of resuming).
    query: Q-DOVE's text query for every image ("" = none: the whole image).
    query_tokenizer, query_tokenizer_path, query_max_length: how the query becomes ids
      (`text.load_tokenizer`).
  """

  budget: int = 0
  eos_threshold: float | None = None
  dtype: str = "float32"
  images_per_shard: int = 1024
  query: str = ""
  query_tokenizer: str = "bytes"
  query_tokenizer_path: str = ""
  query_max_length: int = 32


# -- image sources ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageSource:
  """Records `pipeline.decode_image` reads, with what the manifest says of them."""

  records: Any  # a random-access source
  description: dict  # kind, name, split, folder...: part of the settings a resumed run must match
  # The id of each image (a folder's relative paths); None: its index.
  ids: Sequence[str] | None = None
  classes: Sequence[str] | None = None  # the label names; None: no labels


def open_source(
    kind: str,
    *,
    folder: str = "",
    name: str = "",
    split: str = "train",
    data_dir: str = "",
    builtin_size: int = 64,
) -> ImageSource:
  """The images of `kind`: "builtin" (the DoveShapes set at `builtin_size`, split train or eval, made in
  data_dir the first time), "folder" (every image under `folder`, labelled by class subfolder if it has
  them) or "tfds" (`name`'s `split`, prepared under data_dir)."""
  if kind == "folder":
    root = Path(folder).expanduser().absolute()
    images = sources.ImageFolderSource(root)
    return ImageSource(
        images, {"kind": kind, "folder": str(root)}, images.relative_paths, images.classes or None
    )
  default_dir = "data" if kind == "builtin" else "~/tensorflow_datasets"
  data_dir = str(Path(data_dir or default_dir).expanduser().absolute())
  if kind == "builtin":
    from dove_jax.data import builtin

    if builtin_size not in BUILTIN_SIZES or split not in ("train", "eval", "validation"):
      raise ValueError(
          f"the built-in data set has sizes {BUILTIN_SIZES} and splits train, eval; got size "
          f"{builtin_size}, split {split!r}"
      )
    train, validation = builtin.load_builtin(builtin_size, data_dir)
    records = train if split == "train" else validation
    description = {"kind": kind, "size": builtin_size, "split": split, "data_dir": data_dir}
  elif kind == "tfds":
    records = sources.tfds_source(name, split, data_dir)
    description = {"kind": kind, "name": name, "split": split, "data_dir": data_dir}
  else:
    raise ValueError(f"unknown source {kind!r}; choose builtin, folder or tfds")
  return ImageSource(records, description, classes=sources.class_names(records) or None)


# -- the manifest -----------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    for block in iter(lambda: file.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def plan_shards(num_images: int, images_per_shard: int, process_count: int) -> list[dict]:
  """Consecutive runs of `images_per_shard` images, shard k written by process k % process_count."""
  count = -(-num_images // images_per_shard)
  return [
      {
          "index": k,
          "file": shard_name(k, count, k % process_count),
          "process": k % process_count,
          "start": k * images_per_shard,
          "stop": min((k + 1) * images_per_shard, num_images),
          "state": "pending",
      }
      for k in range(count)
  ]


def manifest_name(process_index: int, process_count: int) -> str:
  """The manifest a process keeps its shards in: manifest.json itself when it is the only one."""
  if process_count == 1:
    return MANIFEST
  return f"manifest.process-{process_index:03d}-of-{process_count:03d}.json"


def new_manifest(
    model_dir: Path,
    model: DOVE,
    token_dim: int,
    source: ImageSource,
    settings: Settings,
    process_index: int,
    process_count: int,
) -> dict:
  """The manifest of a fresh run for process `process_index`: its shards all pending."""
  shards = plan_shards(len(source.records), settings.images_per_shard, process_count)
  return {
      "format": FORMAT,
      "model": {
          "folder": str(model_dir.absolute()),
          "sha256": {
              name: file_sha256(model_dir / name)
              for name in (weights.MODEL_CONFIG, weights.MODEL_WEIGHTS)
          },
          "arguments": json.loads(model.arguments),
      },
      "settings": {
          **dataclasses.asdict(settings),
          "eos_threshold": model.eos_threshold,  # the one in use, the model's unless overridden
          "image_size": model.image_size,
          "source": source.description,
          "images": len(source.records),
          "process_count": process_count,
      },
      "token_dim": token_dim,
      "classes": list(source.classes) if source.classes else None,
      "shards": [shard for shard in shards if shard["process"] == process_index],
  }


def with_totals(manifest: dict) -> dict:
  """The manifest with its counts and its list of skipped images brought up to date from its shards."""
  shards = manifest["shards"]
  done = [shard for shard in shards if shard["state"] == "done"]
  skipped = [image for shard in done for image in shard["skipped"]]
  counts = {
      "images": sum(shard["stop"] - shard["start"] for shard in shards),
      "tokenized": sum(shard["records"] for shard in done),
      "skipped": len(skipped),
      "shards": len(shards),
      "shards_done": len(done),
  }
  return {**manifest, "counts": counts, "skipped": skipped}


def differences(there: dict, here: dict) -> list[str]:
  """What makes an existing manifest's run another one than `here`: model files, format, settings."""
  found = []
  if there.get("format") != here["format"]:
    found.append(f"format: {there.get('format')!r} there, {here['format']!r} now")
  old_files = there.get("model", {}).get("sha256", {})
  for name, digest in here["model"]["sha256"].items():
    if old_files.get(name) != digest:
      found.append(
          f"model {name}: sha256 {str(old_files.get(name))[:12]} there (model "
          f"{there.get('model', {}).get('folder')}), {digest[:12]} now (model "
          f"{here['model']['folder']})"
      )
  old_settings = there.get("settings", {})
  for key, value in here["settings"].items():
    if old_settings.get(key) != value:
      found.append(f"{key}: {old_settings.get(key)!r} there, {value!r} now")
  return found


def claim(out: Path, manifest: dict, process_index: int) -> dict:
  """This process's manifest in OUT: its own from an earlier run of the same settings (done shards kept,
  a done shard whose file is gone is pending again), else `manifest`. Written before any shard. Raises
  ValueError for an OUT that is not a tokenized folder, or that another model or other settings wrote.
  """
  existing = sorted(out.glob("manifest*.json")) if out.is_dir() else []
  if not existing and out.is_dir() and any(out.iterdir()):
    raise ValueError(f"{out} is not empty and holds no manifest.json: choose a new or empty --out")
  for path in existing:
    found = differences(json.loads(path.read_text()), manifest)
    if found:
      raise ValueError(
          f"{out} holds tokens of another model or other settings ({path.name}): "
          + "; ".join(found)
          + ". Choose another --out, or delete it to start over"
      )
  out.mkdir(parents=True, exist_ok=True)
  path = out / manifest_name(process_index, manifest["settings"]["process_count"])
  if path.is_file():
    manifest = json.loads(path.read_text())
    for shard in manifest["shards"]:
      if shard["state"] == "done" and not (out / shard["file"]).is_file():
        shard["state"] = "pending"
  write_json(path, with_totals(manifest))
  return manifest


def merged_manifest(out: Path, process_count: int) -> dict | None:
  """Every process's manifest merged into one, if every shard of every process is done; else None."""
  parts = [out / manifest_name(i, process_count) for i in range(process_count)]
  if not all(part.is_file() for part in parts):
    return None
  manifests = [json.loads(part.read_text()) for part in parts]
  shards = sorted((shard for m in manifests for shard in m["shards"]), key=lambda s: s["index"])
  if any(shard["state"] != "done" for shard in shards):
    return None
  return with_totals({**manifests[0], "shards": shards})


# -- encoding ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def compiled_encode(graphdef: nnx.GraphDef, dtype: np.dtype):
  """encode(params, images, budget, query) -> tokens [B, n, D] in `dtype`, lengths [B], eos_prob [B, n],
  jitted. Cached by model structure, so that every run of one model in a process (the tests, a notebook)
  shares the compiled program; looked up once a run, as hashing a GraphDef costs milliseconds."""

  @xla.jit
  def encode(params, images, budget, query):
    tokens = nnx.merge(graphdef, params).encode(images, budget, **query)
    return tokens.tokens.astype(dtype), tokens.lengths, tokens.eos_prob

  return encode


def query_arguments(model: DOVE, settings: Settings, batch_size: int) -> dict[str, np.ndarray]:
  """Q-DOVE's query ids [B, Q] and mask [B, Q] of `settings.query` for every image; {} without a query."""
  if not settings.query:
    return {}
  if model.query_embed is None:
    raise ValueError(
        "--query needs a Q-DOVE (a model with query_vocab_size > 0); this one reads none"
    )
  from dove_jax import text

  tokenizer = text.load_tokenizer(settings.query_tokenizer, settings.query_tokenizer_path)
  if tokenizer.vocab_size > model.query_embed.num_embeddings:
    raise ValueError(
        f"the {settings.query_tokenizer} tokenizer has {tokenizer.vocab_size} ids but the model's "
        f"query_vocab_size is {model.query_embed.num_embeddings}: it was trained with another tokenizer"
    )
  ids, mask = tokenizer.encode_batch([settings.query] * batch_size, settings.query_max_length)
  return {"query": ids, "query_mask": mask}


def make_encode(model: DOVE, settings: Settings, batch_size: int):
  """(encode, token_dim): encode(images [B, S, S, 3] NumPy) -> (tokens, lengths, eos_prob) as device
  arrays, dispatched asynchronously. The batch is split over this process's devices, the parameters
  replicated."""
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise ValueError(
        f"--batch_size {batch_size} is not a multiple of the {len(devices)} local devices"
    )
  mesh = Mesh(np.array(devices), ("batch",))
  split, replicated = NamedSharding(mesh, P("batch")), NamedSharding(mesh, P())
  graphdef, params = nnx.split(model)
  params = jax.device_put(params, replicated)
  budget = jax.device_put(np.full(batch_size, settings.budget, np.int32), split)  # [B]
  query = jax.device_put(query_arguments(model, settings, batch_size), split)
  compiled = compiled_encode(graphdef, STORAGE_DTYPES[settings.dtype])
  images = jax.ShapeDtypeStruct((batch_size, model.image_size, model.image_size, 3), np.float32)
  token_dim = compiled.eval_shape(params, images, budget, query)[0].shape[-1]

  def encode(images: np.ndarray):
    return compiled(params, jax.device_put(images, split), budget, query)

  return encode, token_dim


# -- writing ----------------------------------------------------------------------------------------------


class ShardWriter:
  """Writes encoded batches as records into this process's pending shards, in image order, and marks each
  shard done in the manifest once its file is closed and renamed. Every call runs on the writer thread.
  """

  def __init__(self, out: Path, manifest: dict, manifest_path: Path, source: ImageSource, progress):
    self.out, self.manifest, self.manifest_path = out, manifest, manifest_path
    self.source, self.progress = source, progress
    # The manifest's own shard dicts: filling them in fills in the manifest.
    self.pending = collections.deque(
        shard for shard in manifest["shards"] if shard["state"] != "done"
    )
    self.writer = None
    self.next_image = None  # the image the next real row of a batch is
    self._open_next_shard()

  def _open_next_shard(self) -> None:
    if not self.pending:
      return
    shard = self.pending[0]
    shard.update(records=0, bytes=0, lengths={}, skipped=[])
    self.next_image = shard["start"]
    self.writer = array_record_module.ArrayRecordWriter(str(self._temporary(shard)), WRITER_OPTIONS)

  def _temporary(self, shard: dict) -> Path:
    return self.out / (shard["file"] + ".tmp")

  def _finish_shard(self) -> None:
    shard = self.pending.popleft()
    self.writer.close()
    final = self.out / shard["file"]
    self._temporary(shard).replace(final)  # atomic: the file is whole or absent
    shard.update(state="done", bytes=final.stat().st_size)
    write_json(self.manifest_path, with_totals(self.manifest))
    self._open_next_shard()

  def add(self, encoded, valid: np.ndarray, labels: np.ndarray) -> None:
    """One batch: `encoded` (tokens, lengths, eos_prob device arrays), valid [B], labels [B]; rows past
    the last pending image are the pipeline's padding."""
    tokens, lengths, eos_prob = (np.asarray(x) for x in encoded)  # waits for the encoder
    rows = 0
    for row in range(len(valid)):
      if not self.pending:
        break
      shard, image = self.pending[0], self.next_image
      image_id = self.source.ids[image] if self.source.ids is not None else image
      if valid[row]:
        length = int(lengths[row])
        label = int(labels[row]) if self.source.classes else None
        record = encode_record(image, image_id, label, tokens[row, :length], eos_prob[row])
        self.writer.write(record)
        shard["records"] += 1
        shard["lengths"][str(length)] = shard["lengths"].get(str(length), 0) + 1
      else:
        shard["skipped"].append({"index": image, "id": image_id})
      rows += 1
      self.next_image += 1
      if self.next_image == shard["stop"]:
        self._finish_shard()
    self.progress.update(rows)


def encode_pending(
    encode, batch_size: int, image_size: int, source: ImageSource, writer: ShardWriter, workers: int
) -> None:
  """Reads the images of the writer's pending shards through the evaluation pipeline, encodes them, and
  hands each batch to the writer thread, at most BATCHES_AHEAD batches ahead of it."""
  indices = [i for shard in writer.pending for i in range(shard["start"], shard["stop"])]
  dataset = pipeline.make_dataset(
      sources.Subset(source.records, indices),
      image_size=image_size,
      # This process reads its own shards' images (shard_by_process=False), `batch_size` at a time.
      global_batch_size=batch_size,
      seed=0,
      train=False,
      worker_count=workers,
      shard_by_process=False,
  )
  in_flight = collections.deque()
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tokenize-writer") as thread:
    for batch in dataset:
      encoded = encode(batch["image"])
      in_flight.append(thread.submit(writer.add, encoded, batch["valid"], batch["label"]))
      if len(in_flight) > BATCHES_AHEAD:
        in_flight.popleft().result()  # raises the writer's error, if any
    for future in in_flight:
      future.result()
  if writer.pending:
    raise RuntimeError(f"the data ended before shard {writer.pending[0]['file']} was complete")


# -- the summary ------------------------------------------------------------------------------------------


def all_lengths(manifest: dict) -> np.ndarray:
  """[N] the length of every tokenized image, from the shards' counts of each length (in no order)."""
  histogram = collections.Counter()
  for shard in manifest["shards"]:
    histogram.update({int(length): count for length, count in shard["lengths"].items()})
  return np.repeat(np.array(list(histogram), np.int64), list(histogram.values()))


def length_summary(manifest: dict, lengths: np.ndarray) -> dict:
  """lengths.json: the distribution of the lengths [N] and what they cost on disk."""
  arguments, settings = manifest["model"]["arguments"], manifest["settings"]
  token_bytes = manifest["token_dim"] * STORAGE_DTYPES[settings["dtype"]].itemsize
  on_disk = sum(shard["bytes"] for shard in manifest["shards"])
  padding = int(np.sum(arguments["max_tokens"] - lengths)) * token_bytes
  count = max(len(lengths), 1)
  values = lengths if len(lengths) else np.zeros(1, np.int64)  # every image skipped: zeros
  return {
      "images": len(lengths),
      "skipped": manifest["counts"]["skipped"],
      "mean": float(np.mean(values)),
      "std": float(np.std(values)),
      "percentiles": {str(p): float(np.percentile(values, p)) for p in PERCENTILES},
      "min": int(values.min()),
      "max": int(values.max()),
      "tokens": int(lengths.sum()),
      "tokens_per_image": float(lengths.sum() / count),
      "max_tokens": arguments["max_tokens"],
      "token_dim": manifest["token_dim"],
      "dtype": settings["dtype"],
      "budget": settings["budget"],
      "bytes_on_disk": on_disk,
      "bytes_if_padded": on_disk + padding,  # every sequence padded to max_tokens
      "bytes_per_image": on_disk / count,
      "bytes_per_image_if_padded": (on_disk + padding) / count,
  }


def write_summary(out: Path, manifest: dict) -> dict:
  """Writes manifest.json (merged), lengths.json and lengths.png; returns the summary. Every file appears
  whole (a temporary, renamed), as two processes finishing at once both write them."""
  from dove_jax.evaluation import plots

  write_json(out / MANIFEST, manifest)
  lengths = all_lengths(manifest)
  summary = length_summary(manifest, lengths)
  write_json(out / SUMMARY, summary)
  if len(lengths):
    temporary = out / f"lengths.{uuid.uuid4().hex}.png"
    label = "forced length" if manifest["settings"]["budget"] else "predicted length"
    plots.length_histogram(lengths, summary["max_tokens"], temporary, label=label)
    temporary.replace(out / "lengths.png")
  return summary


def summary_line(out: Path, summary: dict, shards: int) -> str:
  p = summary["percentiles"]
  return (
      f"{out}: {summary['images']} images tokenized ({summary['skipped']} skipped) in {shards} "
      f"shards; length mean {summary['mean']:.1f}, median {p['50']:g} (5-95%: {p['5']:g}-{p['95']:g});"
      f" {summary['bytes_per_image'] / 1024:.2f} KiB an image on disk, "
      f"{summary['bytes_per_image_if_padded'] / 1024:.2f} KiB padded to {summary['max_tokens']}"
  )


# -- the whole run ----------------------------------------------------------------------------------------


def tokenize(
    model_dir: str | Path,
    source: ImageSource,
    out: str | Path,
    settings: Settings = Settings(),
    *,
    batch_size: int = 32,
    workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
) -> dict | None:
  """Tokenizes this process's shards of `source` into `out` (see the module doc), resuming an earlier
  run of the same settings. Returns the summary (lengths.json) if every process's shards are now done
  (this process wrote the merged manifest and the summary), else None.

  Raises ValueError for an `out` of another model or other settings (naming what differs) or a setting
  the model cannot take; FileNotFoundError for a missing model folder or data set.
  """
  if settings.dtype not in STORAGE_DTYPES:
    raise ValueError(f"dtype {settings.dtype!r}; choose one of {', '.join(STORAGE_DTYPES)}")
  if settings.images_per_shard < 1 or batch_size < 1:
    raise ValueError("images_per_shard and batch_size must be at least 1")
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process index {process_index} is not one of the {process_count} processes")
  model_dir, out = Path(model_dir).expanduser(), Path(out).expanduser()
  model = DOVE.from_pretrained(model_dir)
  if settings.eos_threshold is not None:
    model.eos_threshold = settings.eos_threshold
  encode, token_dim = make_encode(model, settings, batch_size)
  manifest = new_manifest(
      model_dir, model, token_dim, source, settings, process_index, process_count
  )
  manifest = claim(out, manifest, process_index)
  writer = ShardWriter(
      out,
      manifest,
      out / manifest_name(process_index, process_count),
      source,
      tqdm(
          total=sum(s["stop"] - s["start"] for s in manifest["shards"] if s["state"] != "done"),
          unit="img",
          desc="tokenize",
          disable=not progress,
      ),
  )
  done = len(manifest["shards"]) - len(writer.pending)
  if done:
    absl_logging.info(
        "resuming: %d of this process's %d shards are done", done, len(manifest["shards"])
    )
  if writer.pending:
    encode_pending(encode, batch_size, model.image_size, source, writer, workers)
  writer.progress.close()
  merged = merged_manifest(out, process_count)
  return None if merged is None else write_summary(out, merged)


# -- the command line -------------------------------------------------------------------------------------

# The tool's own flags, so that importing this module beside eval.py (whose --out is a global flag) is safe;
# `parse_flags` adds them to absl's for the command line.
FLAGS = flags.FlagValues()
_MODEL = flags.DEFINE_string("model", None, "a save_pretrained model folder", flag_values=FLAGS)
_OUT = flags.DEFINE_string("out", None, "the output folder", flag_values=FLAGS)
_SOURCE = flags.DEFINE_enum(
    "source",
    "builtin",
    ["builtin", "folder", "tfds"],
    "where the images come from",
    flag_values=FLAGS,
)
_FOLDER = flags.DEFINE_string("folder", "", "--source folder: the image folder", flag_values=FLAGS)
_NAME = flags.DEFINE_string("name", "", "--source tfds: the TFDS name", flag_values=FLAGS)
_SPLIT = flags.DEFINE_string(
    "split",
    "train",
    "the split: train or eval for builtin, a TFDS split for tfds",
    flag_values=FLAGS,
)
_DATA_DIR = flags.DEFINE_string(
    "data_dir",
    "",
    "where the data set is prepared (default: data for builtin, ~/tensorflow_datasets for tfds)",
    flag_values=FLAGS,
)
_BUILTIN_SIZE = flags.DEFINE_integer(
    "builtin_size",
    0,
    "--source builtin: its image size, 64 or 256 (default: the smallest one at least the model's)",
    flag_values=FLAGS,
)
_BUDGET = flags.DEFINE_integer(
    "budget", 0, "every image's forced length; 0 = the model's predicted length", flag_values=FLAGS
)
_EOS_THRESHOLD = flags.DEFINE_float(
    "eos_threshold", None, "overrides the model's EOS threshold", flag_values=FLAGS
)
_DTYPE = flags.DEFINE_enum(
    "dtype", "float32", list(STORAGE_DTYPES), "the tokens' storage dtype", flag_values=FLAGS
)
_IMAGES_PER_SHARD = flags.DEFINE_integer(
    "images_per_shard",
    1024,
    "images per shard, the unit of resuming",
    lower_bound=1,
    flag_values=FLAGS,
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 32, "images per encode call of each process", lower_bound=1, flag_values=FLAGS
)
_WORKERS = flags.DEFINE_integer(
    "workers", 0, "grain worker processes that decode images (0: threads)", flag_values=FLAGS
)
_QUERY = flags.DEFINE_string(
    "query", "", "Q-DOVE: one text query for every image", flag_values=FLAGS
)
_QUERY_TOKENIZER = flags.DEFINE_string(
    "query_tokenizer", "bytes", "bytes, gpt-neox or huggingface", flag_values=FLAGS
)
_QUERY_TOKENIZER_PATH = flags.DEFINE_string(
    "query_tokenizer_path", "", "the tokenizer.json (or its folder) of gpt-neox", flag_values=FLAGS
)
_QUERY_MAX_LENGTH = flags.DEFINE_integer(
    "query_max_length", 32, "query tokens; longer queries are cut", flag_values=FLAGS
)
_PROCESS_INDEX = flags.DEFINE_integer(
    "process_index", None, "this process (default: jax.process_index())", flag_values=FLAGS
)
_PROCESS_COUNT = flags.DEFINE_integer(
    "process_count", None, "processes (default: jax.process_count())", flag_values=FLAGS
)
flags.mark_flags_as_required(["model", "out"], flag_values=FLAGS)


def builtin_size(image_size: int) -> int:
  """The smallest built-in size at least `image_size` (the largest if none is)."""
  return next((size for size in BUILTIN_SIZES if size >= image_size), BUILTIN_SIZES[-1])


def main(argv: list[str]) -> None:
  """Runs the command line whose flags `FLAGS` holds (parsed)."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # As train.py and eval.py print, without importing TensorFlow, which nothing here needs.
  console.configure(tensorflow=False)
  distributed.maybe_initialize_distributed()  # several hosts: each process then tokenizes its own shards
  settings = Settings(
      budget=_BUDGET.value,
      eos_threshold=_EOS_THRESHOLD.value,
      dtype=_DTYPE.value,
      images_per_shard=_IMAGES_PER_SHARD.value,
      query=_QUERY.value,
      query_tokenizer=_QUERY_TOKENIZER.value,
      query_tokenizer_path=_QUERY_TOKENIZER_PATH.value,
      query_max_length=_QUERY_MAX_LENGTH.value,
  )
  try:
    size = _BUILTIN_SIZE.value or builtin_size(
        weights.read_model_arguments(_MODEL.value)["image_size"]
    )
    source = open_source(
        _SOURCE.value,
        folder=_FOLDER.value,
        name=_NAME.value,
        split=_SPLIT.value,
        data_dir=_DATA_DIR.value,
        builtin_size=size,
    )
    summary = tokenize(
        _MODEL.value,
        source,
        _OUT.value,
        settings,
        batch_size=_BATCH_SIZE.value,
        workers=_WORKERS.value,
        process_index=_PROCESS_INDEX.value,
        process_count=_PROCESS_COUNT.value,
    )
  except (FileNotFoundError, ValueError) as e:
    if console.verbose():
      raise
    sys.exit(f"tokenize: {e}")
  if summary is None:
    print(
        f"{_OUT.value}: this process's shards are done; the last process to finish writes the summary"
    )
  else:
    shards = json.loads((Path(_OUT.value).expanduser() / MANIFEST).read_text())["counts"]["shards"]
    print(summary_line(Path(_OUT.value), summary, shards))


def parse_flags(argv: list[str]) -> list[str]:
  """app.run's parser: the tool's flags beside absl's own (--help lists the tool's)."""
  flags.FLAGS.append_flag_values(FLAGS)
  for name in FLAGS:
    flags.declare_key_flag(name)
  rest = app.parse_flags_with_usage(argv)
  FLAGS.mark_as_parsed()
  return rest


if __name__ == "__main__":
  xla.restart_with_fast_malloc()  # CPU: no page faults on every call's temporaries
  app.run(main, flags_parser=parse_flags)
