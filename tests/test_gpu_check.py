"""benchmarks/gpu_check.py --dry-run: the GPU check's every section on this CPU at tiny sizes, so that the
prepared command cannot rot before a session is lent a GPU (~60 s on 2 cores)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_check") / "results.json"
  done = subprocess.run(
      [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=400,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(out.read_text())


def test_every_section_ran(results):
  assert results["dry_run"] is True
  sections = results["sections"]
  assert set(sections) == {"environment", "tests", "benchmark_2", "training"}
  assert results["statuses"] == {name: "ok" for name in sections}, {
      name: {k: v for k, v in s.items() if k != "stdout_tail"}
      for name, s in sections.items()
      if s["status"] != "ok"
  }


def test_environment_names_versions_and_devices(results):
  env = results["sections"]["environment"]
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
    assert env["versions"][name], name
  assert env["backend"] == "cpu" and env["device_count"] >= 1 and env["device_kind"]
  assert env["kernels_auto"] == "cpu"  # on the GPU machine: "cudnn"
  assert isinstance(env["missing"], dict)


def test_the_tests_pass(results):
  tests = results["sections"]["tests"]
  assert tests["passed"] > 0 and tests["total"] == tests["passed"] + tests["skipped"]
  assert tests["failed"] == 0 and tests["errors"] == 0 and not tests["failures"]


def test_benchmark_reports_each_phase(results):
  bench = results["sections"]["benchmark_2"]
  assert bench["batch"] == 2 and bench["dtype"] == "bfloat16" and bench["lpips"] is False
  assert bench["kernels"] == "xla"  # what a GPU runs, here on the CPU
  assert results["matmul_peak"]["gflops"] > 0
  for phase in ("encode", "decode", "train_step"):
    stats = bench[phase]
    assert stats["median_s"] > 0 and stats["compile_s"] > 0, phase
    assert stats["images_per_s"] == pytest.approx(2 / stats["median_s"]), phase
    assert stats["gflop"] > 0 and stats["gflops_per_s"] > 0 and stats["xla_memory_mib"] > 0, phase
    assert 0 < stats["peak_fraction"] < 10, phase


def test_training_steps_and_its_step_is_the_benchmarks(results):
  training = results["sections"]["training"]
  assert training["steps"] == 5 and training["timed_steps"] == 4 and training["kernels"] == "xla"
  assert training["steps_per_s"] > 0 and training["images_per_s"] > 0
  assert math.isfinite(training["first_loss"]) and math.isfinite(training["final_loss"])
  # The benchmark's train step, on the shared compilation cache: the same program, loaded.
  assert training["train_step_programs"] == 1 and training["train_step_from_cache"] == 1
