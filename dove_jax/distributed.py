"""Several JAX processes (hosts, or processes on one machine): `jax.distributed.initialize` from the
environment, for every command line (train.py, eval.py, python -m dove_jax.tokenize).

  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python train.py ...   # on host 0
  JAX_COORDINATOR_ADDRESS=host0:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python train.py ...   # on host 1

Under SLURM, Open MPI or on Cloud TPU nothing needs setting: JAX reads the cluster's own variables.
"""

from __future__ import annotations

import os

import jax

# Variables of the clusters whose process count and index jax.distributed reads on its own.
CLUSTER_VARIABLES = ("SLURM_JOB_NUM_NODES", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
# Several processes by hand (any machine, CPU included): the same three on every process.
PROCESS_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def distributed_arguments(environ=os.environ) -> dict | None:
  """jax.distributed.initialize's arguments from the environment: None for one process; {} for a cluster
  JAX detects (SLURM, Open MPI, Cloud TPU); else the coordinator, process count and process id of the
  PROCESS_VARIABLES. Raises ValueError naming what to set when only some of them are."""
  given = {name: environ[name] for name in PROCESS_VARIABLES if environ.get(name)}
  if any(environ.get(name) for name in CLUSTER_VARIABLES) and set(given) <= {PROCESS_VARIABLES[0]}:
    return {}
  if not given:
    return None
  missing = [name for name in PROCESS_VARIABLES if name not in given]
  if missing:
    raise ValueError(
        f"several processes need {', '.join(PROCESS_VARIABLES)} on each (host:port of process 0, the "
        f"number of processes, this one's index from 0); {', '.join(missing)} not set"
    )
  try:
    count, index = int(given["JAX_NUM_PROCESSES"]), int(given["JAX_PROCESS_ID"])
  except ValueError:
    raise ValueError(
        f"JAX_NUM_PROCESSES={given['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
        f"{given['JAX_PROCESS_ID']!r} must be integers"
    ) from None
  if not 0 <= index < count:
    raise ValueError(
        f"JAX_PROCESS_ID={index} is not one of the JAX_NUM_PROCESSES={count} processes"
    )
  return dict(
      coordinator_address=given["JAX_COORDINATOR_ADDRESS"], num_processes=count, process_id=index
  )


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when the environment describes several processes (`distributed_arguments`);
  one process needs nothing. Call it before anything asks JAX for its devices. On the CPU backend the
  processes' collectives go through gloo (XLA's CPU client has none of its own across processes)."""
  if jax.distributed.is_initialized():
    return
  arguments = distributed_arguments()
  if arguments is None:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # read by the CPU client only
  jax.distributed.initialize(**arguments)
