"""Pre-tokenizing throughput: `dove_jax.tokenize` on N built-in images beside a bare loop of the same compiled
encode on images already in memory, at the same batch size; and the bytes an image takes on disk.

  python benchmarks/bench_tokenize.py                          10000 images, the shipped tiny DOVE
  python benchmarks/bench_tokenize.py --images 2000 --model models/dove --dtype bfloat16

Without --model, the shipped tiny DOVE (weights/tiny/dove). Both loops run once unmeasured
first (compiling, reading the data set in), then: bare, tokenize, bare again (the bare figure is their mean,
so the machine's drift counts alike on both sides). The tokenize figure is the whole call, model loading,
file hashes and the summary included. Target: tokenize at >= 0.85 of the bare loop's images/s.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from configs import dove as dove_config  # noqa: E402
from dove_jax import DOVE, tokenize, xla  # noqa: E402
from dove_jax.data import builtin, pipeline, sources  # noqa: E402

IN_MEMORY = 1024  # distinct images the bare loop cycles through (its cost does not depend on them)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=10_000, help="built-in images to tokenize")
  parser.add_argument(
      "--model",
      default=str(dove_config.SHIPPED / "tiny" / "dove"),
      help="a model folder (default: the shipped tiny DOVE)",
  )
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  parser.add_argument("--images_per_shard", type=int, default=1024)
  parser.add_argument(
      "--data_dir", default=str(ROOT / "data"), help="where the built-in set is made"
  )
  parser.add_argument("--json", default="", help="also write the figures to this file")
  return parser.parse_args(argv)


def builtin_images(count: int, image_size: int, data_dir: str) -> tokenize.ImageSource:
  """`count` images of the built-in train split (cycled past its end) at the size nearest the model's."""
  train, _ = builtin.load_builtin(tokenize.builtin_size(image_size), data_dir)
  records = sources.Subset(train, [i % len(train) for i in range(count)])
  return tokenize.ImageSource(
      records, {"kind": "builtin", "images": count}, classes=records.classes
  )


def bare_loop(encode, batches: list[np.ndarray], count: int) -> float:
  """Seconds the compiled encode takes over `count` images (whole batches) already in memory."""
  steps = -(-count // len(batches[0]))
  start = time.perf_counter()
  outputs = [encode(batches[step % len(batches)]) for step in range(steps)]
  jax.block_until_ready(outputs)
  return time.perf_counter() - start


def main(argv=None) -> dict:
  args = parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as scratch:
    results = measure(args, Path(scratch))
  print(
      f"{args.images} images, batch {args.batch_size}, {args.dtype}: tokenize "
      f"{results['tokenize_images_per_s']:.1f} images/s, bare encode "
      f"{results['bare_images_per_s']:.1f} images/s: ratio {results['ratio']:.3f} (target >= 0.85)\n"
      f"on disk {results['bytes_per_image']:.0f} bytes an image at mean length "
      f"{results['mean_length']:.1f}, {results['bytes_per_image_if_padded']:.0f} if padded to "
      f"{results['max_tokens']} ({results['bytes_per_image'] / results['bytes_per_image_if_padded']:.2f}"
      " of it)"
  )
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
  return results


def measure(args: argparse.Namespace, scratch: Path) -> dict:
  """The figures of one run (see the module doc), with the model and the tokens in `scratch`."""
  model_dir = Path(args.model)
  model = DOVE.from_pretrained(model_dir)
  source = builtin_images(args.images, model.image_size, args.data_dir)
  settings = tokenize.Settings(dtype=args.dtype, images_per_shard=args.images_per_shard)
  encode, _ = tokenize.make_encode(model, settings, args.batch_size)
  dataset = pipeline.make_dataset(
      sources.Subset(source.records, range(min(IN_MEMORY, args.images))),
      image_size=model.image_size,
      global_batch_size=args.batch_size,
      seed=0,
      train=False,
  )
  batches = [batch["image"] for batch in dataset]

  def run_tokenize(count: int, out: Path) -> float:
    records = sources.Subset(source.records, range(count))
    part = tokenize.ImageSource(records, source.description, classes=source.classes)
    start = time.perf_counter()
    tokenize.tokenize(model_dir, part, out, settings, batch_size=args.batch_size, progress=False)
    return time.perf_counter() - start

  bare_loop(encode, batches, args.batch_size)  # compiles
  run_tokenize(args.batch_size, scratch / "warm-up")  # compiles, reads the data set's files in
  bare_before = bare_loop(encode, batches, args.images)
  tokenize_s = run_tokenize(args.images, scratch / "tokens")
  bare_after = bare_loop(encode, batches, args.images)
  bare_s = (bare_before + bare_after) / 2
  summary = json.loads((scratch / "tokens" / "lengths.json").read_text())
  return {
      "images": args.images,
      "batch_size": args.batch_size,
      "dtype": args.dtype,
      "model": args.model,
      "device": jax.devices()[0].device_kind,
      "bare_images_per_s": args.images / bare_s,
      "bare_images_per_s_before_after": [args.images / bare_before, args.images / bare_after],
      "tokenize_images_per_s": args.images / tokenize_s,
      "ratio": bare_s / tokenize_s,
      "mean_length": summary["mean"],
      "max_tokens": summary["max_tokens"],
      "bytes_per_image": summary["bytes_per_image"],
      "bytes_per_image_if_padded": summary["bytes_per_image_if_padded"],
  }


if __name__ == "__main__":
  xla.restart_with_fast_malloc()  # CPU: no page faults on every call's temporaries
  main()
