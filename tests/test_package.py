"""The package as a user meets it: light import, configs, the quickstart."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
  return subprocess.run(
      [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
  )


def test_import_loads_neither_tensorflow_nor_torch():
  result = run(
      "-c",
      "import sys, dove_jax; print(sorted(m for m in ('tensorflow', 'torch') if m in sys.modules))",
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


def load_config(preset):
  sys.path.insert(0, str(ROOT))
  try:
    from configs import dove
  finally:
    sys.path.pop(0)
  return dove.get_config(preset)


def test_config_presets():
  paper, tiny = load_config(""), load_config("tiny")
  assert paper.model.image_size == 256 and paper.model.max_tokens == 256
  assert paper.model.vqgan.block_out_channels == (128, 256, 256, 512, 768)
  assert tiny.model.image_size == 64
  with pytest.raises(ValueError, match="unknown preset 'tiyn'"):
    load_config("tiyn")


def test_quickstart_runs_every_budget_through_one_compiled_function():
  result = run("examples/quickstart.py")
  assert result.returncode == 0, result.stderr
  report, *lines = result.stdout.strip().splitlines()
  assert (
      "weights/tiny/dove: 64 px, up to 64 tokens" in report
  )  # the shipped tiny DOVE's folder, by default
  assert [line.split(":")[0].strip() for line in lines] == [
      "predicted",
      "budget 8",
      "budget 32",
      "budget 64",
  ]
  assert "lengths [8, 8, 8, 8]" in lines[1]
