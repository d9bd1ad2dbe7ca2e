"""The training run's metric writer: every value to TensorBoard and to the log (shown with `--verbosity`),
and on the console one progress line per logged step and one line per evaluation."""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

from absl import logging
from clu import metric_writers

# The train metrics of the progress line, and the names it shows them by.
PROGRESS_TERMS = {"loss": "loss", "rec": "rec", "mse": "mse", "length_mean": "length"}
EVAL_TERMS = {
    "length_mean": "length",
    "length_mean_no_query": "length without the query",
    "mse": "mse",
}


class ConsoleWriter(metric_writers.LoggingWriter):
  """clu's LoggingWriter (every value, one INFO line per write; dove_jax.console hides those from libraries
  by default) that also logs the progress line for each write of train metrics:

    step 150/2500: loss 0.0912, rec 0.0907, mse 0.0453, length 61.3, 84.2 images/s, ETA 0:04:39

  and one line for each evaluation after step 0 (the untrained model's figures are where TensorBoard's curves
  start). The speed is over the steps since the previous progress line (none on the first: it would count
  compilation)."""

  def __init__(self, num_steps: int, batch_size: int, clock=time.monotonic):
    super().__init__()
    self.num_steps = num_steps
    self.batch_size = batch_size
    self.clock = clock
    self.last = None  # (step, time) of the previous progress line

  def write_scalars(self, step: int, scalars):
    super().write_scalars(step, scalars)
    if "train/loss" in scalars:
      logging.info("%s", self.progress_line(step, scalars))
    elif step > 0 and any(name.startswith("eval/") for name in scalars):
      logging.info("%s", eval_line(step, scalars))

  def progress_line(self, step: int, scalars) -> str:
    shown = figures(scalars, "train/", PROGRESS_TERMS)
    now = self.clock()
    if self.last is not None and step > self.last[0]:
      steps_per_second = (step - self.last[0]) / (now - self.last[1])
      eta = datetime.timedelta(seconds=round((self.num_steps - step) / steps_per_second))
      shown += [f"{steps_per_second * self.batch_size:.1f} images/s", f"ETA {eta}"]
    self.last = (step, now)
    return f"step {step}/{self.num_steps}: " + ", ".join(shown)


def figures(scalars, prefix: str, terms: dict[str, str]) -> list[str]:
  """ "name value" for each of `terms` (metric -> name shown) written as `prefix` + metric."""
  return [
      f"{shown} {float(scalars[prefix + name]):.4g}"
      for name, shown in terms.items()
      if prefix + name in scalars
  ]


def eval_line(step: int, scalars) -> str:
  """The evaluation's lengths, MSE and PSNR at each forced budget (the quality-versus-tokens curve)."""
  shown = figures(scalars, "eval/", EVAL_TERMS)
  psnr = {
      int(name.split("_")[2]): value
      for name, value in scalars.items()
      if name.startswith("eval/psnr_at_")
  }
  if psnr:
    budgets = sorted(psnr)
    shown.append(
        f"PSNR {' / '.join(f'{psnr[b]:.2f}' for b in budgets)} dB at "
        f"{' / '.join(map(str, budgets))} tokens"
    )
  return f"eval at step {step}: " + ", ".join(shown)


def create_writer(workdir: Path, num_steps: int, batch_size: int, summaries: bool):
  """clu's default writer with the console's lines: TensorBoard event files in `workdir` where `summaries`
  (the first process), and the log."""
  writers = [ConsoleWriter(num_steps, batch_size)]
  if summaries:
    writers.append(metric_writers.SummaryWriter(os.fspath(workdir)))
  return metric_writers.AsyncMultiWriter(writers)
