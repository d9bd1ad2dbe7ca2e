"""What both sides of the benchmark share, without importing either framework: inputs and timing."""
from __future__ import annotations

import resource
import statistics
import time

import numpy as np


def bench_inputs(image_size: int, batch: int) -> np.ndarray:
  """The images both sides run on: [B, H, W, 3] in [-1, 1], NHWC."""
  return np.random.default_rng(0).uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)


def median_time(fn, repeats: int) -> dict:
  """fn() (which must block until done) once to warm up, then `repeats` timed calls; seconds. The median is
  the figure we quote; the best shows how far the noise of a shared 2-core machine reaches."""
  start = time.perf_counter()
  fn()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return {"first_s": first, "median_s": statistics.median(times), "best_s": min(times), "repeats": repeats}


def max_rss_mib() -> float:
  """This process's peak resident memory so far (a high-water mark, not a per-phase figure)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
