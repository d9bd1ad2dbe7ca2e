"""benchmarks/bench_cpu.py without the PyTorch reference (--no-torch: how it runs on an accelerator)."""

import pytest

from benchmarks import bench_cpu
from configs.dove import get_config


def test_dtype_needs_no_torch(capsys):
  with pytest.raises(SystemExit):
    bench_cpu.parse_args(["--dtype", "bfloat16"])
  assert "--dtype bfloat16 needs --no-torch" in capsys.readouterr().err
  args = bench_cpu.parse_args(["--no-torch", "--dtype", "bfloat16"])
  assert args.no_torch and args.dtype == "bfloat16"


def test_forward_alone_reports_ours_and_no_reference():
  config = get_config("tiny")
  peak = 100.0
  run = bench_cpu.bench_forward(config, batch=2, repeats=1, peak=peak, references=[])
  for phase in ("encode", "decode"):
    stats = run[phase]
    assert stats["median_s"] > 0 and stats["images_per_s"] == pytest.approx(2 / stats["median_s"])
    assert stats["gflop"] > 0 and stats["xla_memory_mib"] > 0
    assert stats["peak_fraction"] == pytest.approx(stats["gflop"] / stats["median_s"] / peak)
    assert run["torch"][phase] == {}
  assert "max_abs_diff_vs_torch" not in run

  results = {
      "configs": {"tiny": run},
      "machine": bench_cpu.machine(2),
      "matmul_peak": {"n": 2048, "gflops": peak},
      "dtype": "float32",
      "max_rss_mib": 1.0,
      "device_peak_mib": None,
  }
  lines = bench_cpu.table(results).splitlines()
  assert sum(line.startswith("tiny   encode  jax") for line in lines) == 1
  assert sum(line.startswith("tiny   decode  jax") for line in lines) == 1
  assert not any("torch stock" in line for line in lines)
  assert lines[-1].startswith("peak memory: this process 1 MiB resident, device - MiB")
