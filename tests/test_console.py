"""What a run prints: dove_jax's lines and every warning by default, the libraries' INFO logs on request,
the progress line's figures; `tensorboard_tags` for the command-line tests that check what a run recorded.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

from dove_jax import console

ROOT = Path(__file__).resolve().parents[1]


def tensorboard_tags(workdir: Path) -> set[str]:
  """Every tag written to the TensorBoard event files in `workdir`."""
  from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

  return {
      value.tag
      for path in workdir.glob("events.out.tfevents.*")
      for event in EventFileLoader(str(path)).Load()
      for value in event.summary.value
  }


def record(path: str, level: int) -> logging.LogRecord:
  return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_library_info_is_hidden_and_every_warning_shown():
  ours = os.path.join(console.PACKAGE, "training", "loop.py")
  library = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert console.ours_or_warning(record(ours, logging.INFO))
  assert not console.ours_or_warning(record(library, logging.INFO))
  assert console.ours_or_warning(record(library, logging.WARNING))
  assert console.ours_or_warning(record(library, logging.ERROR))
  # A package beside ours whose name starts like it is a library.
  assert not console.ours_or_warning(record(console.PACKAGE + "_extras/x.py", logging.INFO))


def test_tensorflow_imports_without_its_start_up_lines_and_keeps_other_output():
  code = (
      "import os; from dove_jax import console; os.write(2, b'E0000 00:00 x.cc:1] a real error\\n'); "
      "console.import_tensorflow_quietly(); import sys; sys.stderr.write('after\\n')"
  )
  result = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr
  assert result.stderr == "E0000 00:00 x.cc:1] a real error\nafter\n"


def test_the_captured_stream_keeps_what_is_not_start_up_chatter():
  printed = (
      "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
      "I0000 00:00:1.0 1 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
      "To enable the following instructions: AVX2, rebuild TensorFlow.\n"
      "W0000 00:00:1.0 1 plugin.cc:1] a warning\n"
      "I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\n"
  )
  kept = [
      r for r in console.NATIVE_RECORD.split(printed) if r and not console.NATIVE_START_UP.match(r)
  ]
  assert kept == ["W0000 00:00:1.0 1 plugin.cc:1] a warning\n"]


class Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_lines_show_the_step_losses_length_speed_and_eta(caplog):
  from dove_jax.training.progress import ConsoleWriter

  clock = Clock()
  writer = ConsoleWriter(num_steps=1000, batch_size=16, clock=clock)
  train = {
      "train/loss": 0.5,
      "train/rec": 0.25,
      "train/mse": 0.125,
      "train/length_mean": 40.0,
      "train/grad_norm": 3.0,
  }
  with caplog.at_level(logging.INFO):
    writer.write_scalars(100, train)
    clock.now += 20.0  # 100 steps of 16 images: 5 steps/s, 80 images/s; 800 steps to go: 160 s
    writer.write_scalars(200, train)
    writer.write_scalars(0, {"eval/mse": 0.5, "eval/psnr_at_8_tokens": 7.0})
    writer.write_scalars(
        200,
        {
            "eval/length_mean": 31.5,
            "eval/mse": 0.0625,
            "eval/psnr_at_16_tokens": 19.5,
            "eval/psnr_at_8_tokens": 17.25,
            "eval/length_std": 2.0,
        },
    )
  ours = [r.getMessage() for r in caplog.records if r.pathname.startswith(console.PACKAGE)]
  assert ours == [
      "step 100/1000: loss 0.5, rec 0.25, mse 0.125, length 40",
      "step 200/1000: loss 0.5, rec 0.25, mse 0.125, length 40, 80.0 images/s, ETA 0:02:40",
      "eval at step 200: length 31.5, mse 0.0625, PSNR 17.25 / 19.50 dB at 8 / 16 tokens",
  ]
