"""Several processes by hand (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID): two train.py
processes on localhost, one CPU device each, reach the parameters of one process on two devices, through a
kill -9 and a resume (mesh.fsdp = 2) and plainly (mesh.data = 2); eval.py in two processes, each batch
split over both, writes the figures of one process on one device. Missing or wrong variables fail naming
what to set."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from dove_jax.distributed import distributed_arguments
from test_training import ROOT, final_params, train_command, wait_for_checkpoint


def popen(args: list[str], env: dict) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, *args],
      cwd=ROOT,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env={**os.environ, **env},
  )


def start_one(args: list[str], devices: int) -> subprocess.Popen:
  """`python ARGS` as one process with `devices` CPU devices."""
  return popen(args, {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})


def start(args: list[str], processes: int = 2) -> list[subprocess.Popen]:
  """`python ARGS` as `processes` JAX processes on localhost, one CPU device each."""
  with socket.socket() as probe:  # a free port for the coordinator
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  return [
      popen(
          args,
          {
              "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
              "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
              "JAX_NUM_PROCESSES": str(processes),
              "JAX_PROCESS_ID": str(index),
          },
      )
      for index in range(processes)
  ]


def finish(processes: list[subprocess.Popen]) -> list[str]:
  """Each process's stderr, once all have exited 0."""
  outputs = [process.communicate(timeout=600) for process in processes]
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  return [err for _, err in outputs]


def assert_same_parameters(a, b, steps: int):
  params_a, _ = final_params(a, steps)
  params_b, _ = final_params(b, steps)
  assert len(params_a) == len(params_b)
  for x, y in zip(params_a, params_b):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


FAST = ("--config.loss.lpips_weight=0", "--config.train.log_every=1")


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory, builtin_data_dir):
  """(one process on 2 devices, two processes killed at a checkpoint and resumed), mesh.fsdp = 2, 6 steps."""
  root = tmp_path_factory.mktemp("fsdp")
  extra = (
      *FAST,
      "--config.mesh.data=1",
      "--config.mesh.fsdp=2",
      "--config.train.checkpoint_every=1",
  )
  one = start_one(train_command(root / "one", builtin_data_dir, 6, *extra), 2)
  command = train_command(root / "two", builtin_data_dir, 6, *extra)
  first = start(command)
  killed_after = wait_for_checkpoint(root / "two", 2, first[0])
  for process in first:
    process.kill()
    process.communicate()
  assert killed_after < 6, "the kill came too late to test anything"
  resumed = finish(start(command))
  assert all(f"resuming from step {killed_after}" in err for err in resumed), resumed[0][-3000:]
  finish([one])
  return root / "one", root / "two"


def test_two_processes_killed_and_resumed_equal_one_process_on_two_devices(fsdp_runs):
  assert_same_parameters(*fsdp_runs, 6)


def test_two_processes_data_parallel_equal_one_process_on_two_devices(tmp_path, builtin_data_dir):
  extra = (*FAST, "--config.mesh.data=2", "--config.mesh.fsdp=1")
  command = train_command(tmp_path / "two", builtin_data_dir, 3, *extra)
  two = start(command)
  one = start_one(train_command(tmp_path / "one", builtin_data_dir, 3, *extra), 2)
  finish([*two, one])
  assert_same_parameters(tmp_path / "one", tmp_path / "two", 3)


def test_eval_in_two_processes_writes_the_figures_of_one(fsdp_runs, builtin_data_dir, tmp_path):
  _, run = fsdp_runs
  command = [
      "eval.py",
      f"--workdir={run}",
      "--max_batches=1",
      "--probe_per_class=1",
      f"--config.data.data_dir={builtin_data_dir}",
  ]
  two = start([*command, f"--out={tmp_path / 'two'}"])
  one = start_one([*command, f"--out={tmp_path / 'one'}"], 1)
  finish([*two, one])
  one_figures, two_figures = (
      json.loads((tmp_path / name / "metrics.json").read_text()) for name in ("one", "two")
  )
  for key in ("reconstruction", "vqgan", "lengths", "linear_probe"):
    assert one_figures[key] == two_figures[key], key
  assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
      p.name for p in (tmp_path / "one").iterdir()
  )


def test_missing_or_wrong_process_variables_name_what_to_set():
  assert distributed_arguments({}) is None
  assert distributed_arguments({"SLURM_JOB_NUM_NODES": "2"}) == {}  # JAX reads SLURM's own
  assert distributed_arguments(
      {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}
  ) == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID not set"):
    distributed_arguments({"JAX_COORDINATOR_ADDRESS": "h:1"})
  with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS not set"):
    distributed_arguments({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "0"})
  with pytest.raises(ValueError, match="JAX_PROCESS_ID=2 is not one of the JAX_NUM_PROCESSES=2"):
    distributed_arguments(
        {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}
    )
