"""Shared test helpers."""
import contextlib

import jax
import pytest

# Parity tests compare float32 results with PyTorch at 1e-4: keep XLA's matmuls and convs at full precision.
jax.config.update("jax_default_matmul_precision", "highest")


class CompileCounter:
  """Counts XLA compilations (jax.monitoring's backend-compile event) while active."""

  def __init__(self):
    self.count = 0

  def __call__(self, event: str, duration: float, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1


@pytest.fixture
def count_compiles():
  """`with count_compiles() as c: ...; c.count` is the number of compilations inside the block."""
  @contextlib.contextmanager
  def counting():
    counter = CompileCounter()
    jax.monitoring.register_event_duration_secs_listener(counter)
    try:
      yield counter
    finally:
      jax.monitoring.unregister_event_duration_listener(counter)
  return counting


@pytest.fixture(scope="session")
def builtin_data_dir(tmp_path_factory):
  """The built-in 64 px data set, generated once (~18 s) for every command-line run of the session."""
  from dove_jax.data.builtin import load_builtin
  path = tmp_path_factory.mktemp("builtin_data")
  load_builtin(64, str(path))
  return path
