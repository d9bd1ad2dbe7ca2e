"""Shared test helpers."""

import os

import jax
import pytest

from dove_jax import xla

# Parity tests compare float32 results with PyTorch at 1e-4: keep XLA's matmuls and convs at full precision.
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def count_compiles():
  """`with count_compiles() as c: ...; c.count` is the number of compilations inside the block."""
  return xla.CompileCounter


@pytest.fixture(scope="session")
def builtin_data_dir(tmp_path_factory):
  """The built-in 64 px data set, generated once (~18 s) for every command-line run of the session."""
  from dove_jax.data.builtin import load_builtin

  path = tmp_path_factory.mktemp("builtin_data")
  load_builtin(64, str(path))
  return path


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """The command-line runs the tests start (train.py, eval.py, convert) share one persistent compilation
  cache, so the initialisers, train steps and eval functions they have in common compile once for all of
  them: every parameter shape's initialiser alone costs XLA ~0.2-0.4 s on 2 cores. Only child processes
  see this: the test process read JAX's settings when it imported jax."""
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("compilation_cache"))
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, builtin_data_dir):
  """(workdir, the finished process) of one tiny DOVE run for 3 steps from the command line, with its own
  compilation cache (not the tests' shared one): the run that the training tests read and eval.py and
  export start from, trained once for all of them."""
  from test_training import python, train_command

  workdir = tmp_path_factory.mktemp("tiny_run")
  with pytest.MonkeyPatch.context() as patch:
    patch.delenv("JAX_COMPILATION_CACHE_DIR")
    result = python(train_command(workdir, builtin_data_dir, 3, "--config.train.log_every=1"))
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


# pytest-xdist hands whole files to its workers in collection order: the slowest files go first, so that
# none is left running alone on one worker at the end.
SLOWEST_FIRST = (
    "test_processes.py",
    "test_training.py",
    "test_qdove.py",
    "test_eval_run.py",
    "test_fidelity.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))
