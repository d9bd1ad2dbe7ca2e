"""What both sides of the benchmark share, without importing either framework: inputs and timing."""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np


def bench_inputs(image_size: int, batch: int) -> np.ndarray:
  """The images both sides run on: [B, H, W, 3] in [-1, 1], NHWC."""
  return (
      np.random.default_rng(0).uniform(-1, 1, (batch, image_size, image_size, 3)).astype(np.float32)
  )


def seconds(fn):
  """fn (which must block until done) -> a call that runs it once and returns the seconds it took."""

  def call() -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start

  return call


def interleaved_times(
    calls: dict, repeats: int, settle_s: float = 0.0, warm_calls: int = 0
) -> dict[str, dict]:
  """Each of `calls` (name -> a call returning the seconds it took) once to warm up, then `repeats` rounds
  that give each a turn, so that every side meets the same moments of a shared, noisy machine. A turn sleeps
  `settle_s` (so that the previous side's threads stop spinning: OpenMP's and OpenBLAS's spin for a while
  after their work, and on 2 cores a spinning thread halves the next call's machine), runs `warm_calls`
  untimed calls (so that each side is timed in its steady state, as in a loop of its own: the first call
  after another process ran pays for memory that process took), then the timed one. Per name: the median
  (the figure we quote), the best (how far the noise reaches) and every time."""

  def turn(call, warm_calls):
    time.sleep(settle_s)
    for _ in range(warm_calls):
      call()
    return call()

  first = {name: turn(call, 0) for name, call in calls.items()}
  times = {name: [] for name in calls}
  for _ in range(repeats):
    for name, call in calls.items():
      times[name].append(turn(call, warm_calls))
  return {
      name: {
          "first_s": first[name],
          "median_s": statistics.median(times[name]),
          "best_s": min(times[name]),
          "repeats": repeats,
          "times_s": times[name],
      }
      for name in calls
  }


def median_time(fn, repeats: int) -> dict:
  """fn() (which must block until done) once to warm up, then `repeats` timed calls (interleaved_times)."""
  return interleaved_times({"fn": seconds(fn)}, repeats)["fn"]


def max_rss_mib() -> float:
  """This process's peak resident memory so far (a high-water mark, not a per-phase figure)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
