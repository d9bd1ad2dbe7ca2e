"""Pre-tokenizing (`python -m dove_jax.tokenize`) and reading the tokens back (`token_records`): records
equal to the model's encode, padding and packing, resuming after kill -9, unreadable images, refused
folders, several processes."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grain
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from dove_jax import DOVE, save_pretrained, tokenize, weights, xla
from dove_jax.data import pipeline, sources, token_records
from dove_jax.tensor_io import param_dict
from test_dove import TINY

ROOT = Path(__file__).resolve().parents[1]
NUM_IMAGES = 24  # 12 a class
SHARD = 5  # images a shard: batches of 4 straddle shards


def random_dove(seed: int, **overrides) -> DOVE:
  """A tiny DOVE with random weights drawn in NumPy (its own initialisers take ~8 s on 2 cores): unit
  norm scales, zero biases, kernels scaled by their fan-in, which gives lengths that differ per image.
  """
  model = weights.shaped_model(lambda: DOVE(**TINY, **overrides, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(seed)
  for name, variable in param_dict(model).items():
    shape, dtype = variable[...].shape, variable[...].dtype
    if name.endswith("scale"):
      value = np.ones(shape)
    elif name.endswith("bias"):
      value = np.zeros(shape)
    else:
      value = rng.normal(size=shape) / np.sqrt(max(int(np.prod(shape[:-1])), 1))
    variable[...] = value.astype(dtype)
  return model


def write_images(folder: Path, count: int, seed: int = 0) -> None:
  """`count` PNGs of 40 x 48 pixels in two class folders: noise, gradients, flat colours."""
  rng = np.random.default_rng(seed)
  for i in range(count):
    if i % 3 == 0:
      image = rng.integers(0, 256, (40, 48, 3))
    elif i % 3 == 1:
      image = np.linspace(0, 255, 48)[None, :, None] * rng.uniform(0, 1, 3) * np.ones((40, 1, 1))
    else:
      image = np.ones((40, 48, 3)) * rng.integers(0, 256, 3)
    path = folder / ("cats" if i % 2 else "dogs") / f"{i:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.astype(np.uint8)).save(path)


def cli(*args) -> None:
  """`python -m dove_jax.tokenize ARGS`, in this process."""
  tokenize.FLAGS.unparse_flags()
  tokenize.FLAGS(["tokenize", *map(str, args)])
  tokenize.main(["tokenize"])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("model")
  save_pretrained(random_dove(0), path)
  return path


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  path = tmp_path_factory.mktemp("images")
  write_images(path, NUM_IMAGES)
  return path


def folder_args(model_dir, folder, out, *extra):
  return (
      *("--model", model_dir, "--source", "folder", "--folder", folder, "--out", out),
      *("--images_per_shard", SHARD, "--batch_size", 4),
      *extra,
  )


@pytest.fixture(scope="module")
def tokenized(model_dir, folder, tmp_path_factory):
  """The folder tokenized at the predicted lengths in float32."""
  out = tmp_path_factory.mktemp("tokens") / "predicted"
  cli(*folder_args(model_dir, folder, out))
  return out


def expected_tokens(model_dir, folder, budget: int = 0) -> dict:
  """What the model gives for the folder's images through the evaluation pipeline: tokens [N, n, D],
  lengths [N], eos_prob [N, n]."""
  model = DOVE.from_pretrained(model_dir)
  graphdef, params = nnx.split(model)
  encode = xla.jit(lambda params, images: nnx.merge(graphdef, params).encode(images, budget))
  dataset = pipeline.make_dataset(
      sources.ImageFolderSource(folder), image_size=32, global_batch_size=4, seed=0, train=False
  )
  outputs = [encode(params, batch["image"]) for batch in dataset]
  return {
      key: np.concatenate([np.asarray(getattr(out, key)) for out in outputs])[:NUM_IMAGES]
      for key in ("tokens", "lengths", "eos_prob")
  }


def test_records_are_the_models_tokens_at_their_own_length(model_dir, folder, tokenized):
  expected = expected_tokens(model_dir, folder)
  assert len(set(expected["lengths"])) > 1  # the random model gives images different lengths
  records = token_records.read_tokens(tokenized)
  assert len(records) == NUM_IMAGES and records.token_dim == 32 and records.max_tokens == 16
  paths = sources.ImageFolderSource(folder).relative_paths
  for i in range(NUM_IMAGES):
    record, length = records[i], expected["lengths"][i]
    assert record["index"] == i and record["id"] == paths[i]
    assert record["label"] == (0 if paths[i].startswith("cats/") else 1)
    assert record["length"] == length and record["tokens"].shape == (length, 32)
    np.testing.assert_array_equal(record["tokens"], expected["tokens"][i, :length])
    np.testing.assert_array_equal(record["eos_prob"], expected["eos_prob"][i])

  manifest = json.loads((tokenized / "manifest.json").read_text())
  assert manifest["counts"] == {
      "images": 24,
      "tokenized": 24,
      "skipped": 0,
      "shards": 5,
      "shards_done": 5,
  }
  assert [(s["start"], s["stop"], s["state"]) for s in manifest["shards"]] == [
      (0, 5, "done"),
      (5, 10, "done"),
      (10, 15, "done"),
      (15, 20, "done"),
      (20, 24, "done"),
  ]
  assert manifest["classes"] == ["cats", "dogs"] and manifest["settings"]["eos_threshold"] == 0.5
  summary = json.loads((tokenized / "lengths.json").read_text())
  lengths = expected["lengths"]
  assert summary["images"] == 24 and summary["mean"] == pytest.approx(lengths.mean())
  assert summary["percentiles"]["50"] == pytest.approx(np.percentile(lengths, 50))
  assert summary["min"] == lengths.min() and summary["max"] == lengths.max()
  padding = int(np.sum(16 - lengths)) * 32 * 4
  assert summary["bytes_if_padded"] == summary["bytes_on_disk"] + padding
  assert (tokenized / "lengths.png").stat().st_size > 0


def test_a_forced_budget_in_bfloat16_is_the_cast_of_the_models_tokens(model_dir, folder, tmp_path):
  cli(*folder_args(model_dir, folder, tmp_path, "--budget", 6, "--dtype", "bfloat16"))
  expected = expected_tokens(model_dir, folder, budget=6)
  records = token_records.read_tokens(tmp_path)
  assert records.dtype == ml_dtypes.bfloat16
  for i in range(NUM_IMAGES):
    assert records[i]["length"] == 6 and records[i]["tokens"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(
        records[i]["tokens"], expected["tokens"][i, :6].astype(ml_dtypes.bfloat16)
    )


def test_padded_batches_and_packed_windows_give_back_every_sequence(tokenized):
  records = token_records.read_tokens(tokenized)
  sequences = [records[i]["tokens"] for i in range(len(records))]
  lengths = np.array([len(s) for s in sequences])

  pad = functools.partial(token_records.pad_to_bucket, max_tokens=16, bucket_sizes=(4, 8))
  for batch in grain.MapDataset.source(records).batch(6, batch_fn=pad):
    size = batch["tokens"].shape[1]
    longest = batch["length"].max()
    assert size == min([s for s in (4, 8) if s >= longest], default=16)
    np.testing.assert_array_equal(batch["mask"].sum(1), batch["length"])
    for row, index in enumerate(batch["index"]):
      np.testing.assert_array_equal(batch["tokens"][row, batch["mask"][row]], sequences[index])
      assert not batch["tokens"][row, ~batch["mask"][row]].any()

  windows = list(
      token_records.pack(
          grain.MapDataset.source(records).to_iter_dataset(), window=20, max_segments=6
      )
  )
  unpacked = {}
  for window in windows:
    assert window["tokens"].shape == (20, 32) and window["index"].shape == (6,)
    parts = token_records.unpack(window)
    indices = window["index"][window["index"] >= 0]
    assert len(parts) == len(indices)
    for index, part in zip(indices, parts):
      assert index not in unpacked
      unpacked[index] = part
    for segment, part in enumerate(parts, start=1):
      np.testing.assert_array_equal(
          window["positions"][window["segment_ids"] == segment], np.arange(len(part))
      )
    assert not window["tokens"][window["segment_ids"] == 0].any()
  assert sorted(unpacked) == list(range(len(records)))
  for index, part in unpacked.items():
    np.testing.assert_array_equal(part, sequences[index])
  assert len(windows) < len(records)  # windows hold several sequences
  assert lengths.sum() == sum((w["segment_ids"] > 0).sum() for w in windows)


def test_two_processes_write_their_own_shards_and_the_last_merges(
    model_dir, folder, tokenized, tmp_path
):
  args = folder_args(model_dir, folder, tmp_path, "--process_count", 2)
  cli(*args, "--process_index", 1)
  assert not (tmp_path / "manifest.json").exists()
  cli(*args, "--process_index", 0)
  manifest = json.loads((tmp_path / "manifest.json").read_text())
  assert [s["process"] for s in manifest["shards"]] == [0, 1, 0, 1, 0]
  assert all(".process-001." in s["file"] for s in manifest["shards"] if s["process"] == 1)
  both, one = token_records.read_tokens(tmp_path), token_records.read_tokens(tokenized)
  assert len(both) == len(one)
  for i in range(len(one)):
    np.testing.assert_array_equal(both[i]["tokens"], one[i]["tokens"])


# Reads each image 0.1 s late, so that the test sees the first shard done before the last one is.
SLOW_READS = """
import sys, time
from absl import app
from dove_jax import tokenize
from dove_jax.data import sources

read = sources.read_image_bytes
sources.read_image_bytes = lambda path: (time.sleep(0.1), read(path))[1]
app.run(tokenize.main, flags_parser=tokenize.parse_flags)
"""


def test_killed_and_rerun_every_image_is_there_once(model_dir, folder, tokenized, tmp_path):
  """Killed on 2 devices (each encodes half of every batch) and re-run here on 1: every image once, and
  the same tokens as the whole run on 1 device."""
  out = tmp_path / "tokens"
  args = [str(a) for a in folder_args(model_dir, folder, out)]
  log = tmp_path / "stderr.txt"
  with open(log, "w") as stderr:
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_READS, *args],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
  manifest = {}
  deadline = time.monotonic() + 120
  while process.poll() is None and time.monotonic() < deadline:
    if (out / "manifest.json").is_file():
      manifest = json.loads((out / "manifest.json").read_text())
      if manifest["counts"]["shards_done"]:
        os.kill(process.pid, signal.SIGKILL)
        break
    time.sleep(0.01)
  assert process.wait() == -signal.SIGKILL, log.read_text()[-3000:]
  manifest = json.loads((out / "manifest.json").read_text())
  done = [s["file"] for s in manifest["shards"] if s["state"] == "done"]
  assert 1 <= len(done) < len(manifest["shards"])
  kept = {name: (out / name).stat().st_mtime_ns for name in done}

  cli(*args)
  records = token_records.read_tokens(out)
  assert sorted(records[i]["index"] for i in range(len(records))) == list(range(NUM_IMAGES))
  assert {name: (out / name).stat().st_mtime_ns for name in done} == kept  # not written again
  assert not list(out.glob("*.array_record.tmp"))
  one_device = token_records.read_tokens(tokenized)
  for i in range(len(records)):
    np.testing.assert_array_equal(records[i]["tokens"], one_device[i]["tokens"])


def test_an_unreadable_image_is_skipped_and_listed(model_dir, tmp_path, capsys):
  images = tmp_path / "images"
  write_images(images, 6)
  (images / "cats" / "broken.png").write_bytes(b"not a png")
  cli(*folder_args(model_dir, images, tmp_path / "tokens"))
  manifest = json.loads((tmp_path / "tokens" / "manifest.json").read_text())
  assert manifest["skipped"] == [{"index": 3, "id": "cats/broken.png"}]
  assert manifest["counts"]["skipped"] == 1 and manifest["counts"]["tokenized"] == 6
  records = token_records.read_tokens(tmp_path / "tokens")
  ids = [records[i]["id"] for i in range(len(records))]
  assert "cats/broken.png" not in ids and len(ids) == 6
  assert json.loads((tmp_path / "tokens" / "lengths.json").read_text())["skipped"] == 1
  assert "6 images tokenized (1 skipped) in 2 shards" in capsys.readouterr().out


def test_a_folder_of_another_model_or_other_settings_is_refused(
    model_dir, folder, tokenized, tmp_path
):
  with pytest.raises(SystemExit, match=r"dtype: 'float32' there, 'bfloat16' now"):
    cli(*folder_args(model_dir, folder, tokenized, "--dtype", "bfloat16"))
  with pytest.raises(
      SystemExit, match=r"budget: 0 there, 8 now.*eos_threshold: 0.5 there, 0.3 now"
  ):
    cli(*folder_args(model_dir, folder, tokenized, "--budget", 8, "--eos_threshold", 0.3))
  other = tmp_path / "other_model"
  save_pretrained(random_dove(1), other)
  with pytest.raises(SystemExit, match=r"model model.safetensors: sha256 \w+ there .* now"):
    cli(*folder_args(other, folder, tokenized))
  (tmp_path / "notes.txt").write_text("mine")
  with pytest.raises(SystemExit, match="not empty and holds no manifest.json"):
    cli(*folder_args(model_dir, folder, tmp_path))
  assert len(token_records.read_tokens(tokenized)) == NUM_IMAGES  # untouched


def test_a_qdove_reads_the_query(model_dir, tmp_path):
  model = random_dove(2, query_vocab_size=257)
  save_pretrained(model, tmp_path / "qdove")
  images = tmp_path / "images"
  write_images(images, 4)
  cli(*folder_args(tmp_path / "qdove", images, tmp_path / "tokens", "--query", "the red square"))
  from dove_jax.text import ByteTokenizer

  ids, mask = ByteTokenizer().encode_batch(["the red square"] * 4, 32)
  batch = next(
      iter(
          pipeline.make_dataset(
              sources.ImageFolderSource(images),
              image_size=32,
              global_batch_size=4,
              seed=0,
              train=False,
          )
      )
  )
  graphdef, params = nnx.split(model)
  expected = xla.jit(lambda p, x, q, m: nnx.merge(graphdef, p).encode(x, 0, q, m))(
      params, batch["image"], ids, mask
  )
  records = token_records.read_tokens(tmp_path / "tokens")
  for i in range(4):
    length = int(expected.lengths[i])
    np.testing.assert_array_equal(records[i]["tokens"], np.asarray(expected.tokens)[i, :length])
  manifest = records.manifest
  assert manifest["settings"]["query"] == "the red square"
  with pytest.raises(SystemExit, match="--query needs a Q-DOVE"):
    cli(*folder_args(model_dir, images, tmp_path / "plain", "--query", "x"))
