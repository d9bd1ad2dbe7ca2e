"""Time to the first train step, compiled from scratch and loaded from the persistent compilation cache.

  python benchmarks/bench_startup.py            tiny config (~2 min on 2 cores)
  python benchmarks/bench_startup.py --paper    + the paper config (~4 min more)

What a training run (train.py) does before its first step, in a fresh process each time: build the model,
the discriminator and the optimizer state (`setup.build_training`: every initialiser is a small XLA program)
and trace and compile the train step. Each config runs twice on one empty cache directory
(`xla.cache_compiled_programs`, as train.py does with workdir/compilation_cache): the first process
compiles and stores, the second is what a resumed or repeated run pays. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"tiny": "tiny", "paper": ""}  # name -> configs/dove.py preset


def startup(name: str, cache: str, batch: int) -> dict:
  """In this (fresh) process: seconds to build the train state and to compile the train step."""
  sys.path.insert(0, str(ROOT))
  import jax
  import numpy as np

  from configs.dove import get_config
  from dove_jax import xla
  from dove_jax import mesh as meshlib
  from dove_jax.training.setup import build_training

  xla.cache_compiled_programs(cache)
  config = get_config(PRESETS[name])
  mesh = meshlib.make_mesh(1, 1, devices=jax.devices()[:1])
  with xla.CompileCounter() as init_programs:
    start = time.perf_counter()
    setup = build_training(config, mesh, num_steps=1000)
    jax.block_until_ready(setup.state)
    init_s = time.perf_counter() - start
  size = config.model.image_size
  data = meshlib.global_batch(
      {"image": np.zeros((batch, size, size, 3), np.float32), "valid": np.ones((batch,), bool)},
      mesh,
  )
  with xla.CompileCounter() as step_programs:
    start = time.perf_counter()
    setup.train_step.lower(setup.state, data, setup.lpips).compile()
    compile_s = time.perf_counter() - start
  return {
      "init_s": init_s,
      "init_programs": init_programs.count,
      "init_from_cache": init_programs.cache_hits,
      "train_step_compile_s": compile_s,
      "train_step_from_cache": step_programs.cache_hits,
  }


def run_child(name: str, cache: str, batch: int) -> dict:
  result = subprocess.run(
      [sys.executable, __file__, "--child", name, "--cache", cache, "--batch", str(batch)],
      capture_output=True,
      text=True,
      cwd=ROOT,
      check=False,
  )
  if result.returncode:
    raise RuntimeError(f"{name} startup failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--paper", action="store_true", help="also the paper config (batch 1)")
  parser.add_argument("--batch", type=int, default=8, help="tiny-config batch")
  parser.add_argument("--out", default="benchmarks/results_startup.json")
  parser.add_argument("--child", choices=PRESETS, help=argparse.SUPPRESS)
  parser.add_argument("--cache", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(startup(args.child, args.cache, args.batch)))
    return

  results = {}
  for name, batch in [("tiny", args.batch)] + ([("paper", 1)] if args.paper else []):
    with tempfile.TemporaryDirectory() as cache:
      results[name] = {
          "batch": batch,
          "compiled": run_child(name, cache, batch),
          "from_cache": run_child(name, cache, batch),
      }
  print("| config | run | build state s | programs (from cache) | compile train step s | total s |")
  print("|---|---|---|---|---|---|")
  for name, runs in results.items():
    for run, r in (("compiled", runs["compiled"]), ("from cache", runs["from_cache"])):
      total = r["init_s"] + r["train_step_compile_s"]
      print(
          f"| {name}, batch {runs['batch']} | {run} | {r['init_s']:.1f} | {r['init_programs']} "
          f"({r['init_from_cache']}) | {r['train_step_compile_s']:.1f} | {total:.1f} |"
      )
  Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
  main()
