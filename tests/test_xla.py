"""dove_jax.xla: the library's jit compiles with its XLA options, they change the CPU program, and compiled
programs are kept across processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from dove_jax import xla
from dove_jax.models import vqgan

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the options are the CPU backend's"
)


def encoder_program(jit) -> str:
  encoder = vqgan.Encoder(
      in_channels=3,
      out_channels=8,
      block_out_channels=(8, 16),
      layers_per_block=1,
      norm_num_groups=4,
      mid_block_attention=False,
      rngs=nnx.Rngs(0),
  )
  graphdef, state = nnx.split(encoder)
  apply = jit(lambda state, x: nnx.merge(graphdef, state)(x))
  return apply.lower(state, np.zeros((2, 16, 16, 3), np.float32)).compile().as_text()


def test_cpu_compiles_without_ynnpack_fusions():
  assert xla.compiler_options() == xla.CPU_OPTIONS
  # XLA's default hands the convolution stack to YNNPACK fusions; the library's jit keeps XLA's own kernels.
  assert "ynn_fusion" in encoder_program(jax.jit)
  assert "ynn_fusion" not in encoder_program(xla.jit)


def test_jit_as_decorator_passes_jit_arguments():
  @xla.jit(static_argnames="power")
  def raise_to(x, power):
    return x**power

  assert float(raise_to(np.float32(3), power=2)) == 9.0
  assert "ynn_fusion" not in raise_to.lower(np.float32(3), power=2).compile().as_text()


CACHE_SCRIPT = """
import sys
import jax, jax.numpy as jnp, numpy as np
from dove_jax import xla
print(xla.cache_compiled_programs(sys.argv[1]))  # keeps even this program (compiled in well under 1 s)
with xla.CompileCounter() as compiled:
  xla.jit(lambda x: jnp.tanh(x @ x.T).sum())(np.ones((8, 8), np.float32))
print(compiled.count, compiled.cache_hits)
"""


def test_a_second_process_loads_the_compiled_program_from_the_cache(tmp_path):
  env = {
      name: value
      for name, value in os.environ.items()
      if not name.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))
  }

  def run(cache, **extra_env):
    result = subprocess.run(
        [sys.executable, "-c", CACHE_SCRIPT, str(cache)],
        capture_output=True,
        text=True,
        env={**env, **extra_env},
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    directory, counts = result.stdout.strip().splitlines()[-2:]
    return directory, tuple(int(n) for n in counts.split())

  assert run(tmp_path / "cache") == (str(tmp_path / "cache"), (1, 0))  # compiled and stored
  assert run(tmp_path / "cache") == (str(tmp_path / "cache"), (1, 1))  # loaded
  # A cache the user set already (JAX_COMPILATION_CACHE_DIR) is the one used.
  assert run(
      tmp_path / "ignored",
      JAX_COMPILATION_CACHE_DIR=str(tmp_path / "users"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
  ) == (str(tmp_path / "users"), (1, 0))
  assert list((tmp_path / "users").iterdir()) and not (tmp_path / "ignored").exists()


MALLOC_SCRIPT = """
import json, os, resource, sys
from dove_jax import xla
xla.restart_with_fast_malloc()
import jax, jax.numpy as jnp, numpy as np
# The product is a 64 MiB temporary of the compiled program, allocated afresh on every call.
column_sums = xla.jit(lambda a, b: jnp.sum(jnp.tanh(a @ b), axis=0))
a, b = np.ones((2048, 64), np.float32), np.ones((64, 8192), np.float32)
column_sums(a, b).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
column_sums(a, b).block_until_ready()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
mimalloc_loaded = "libmimalloc" in open("/proc/self/maps").read()
print(json.dumps([{name: os.environ[name] for name in xla.MALLOC_VARIABLES if name in os.environ}, sys.argv[1:],
                  mimalloc_loaded, faults]))
"""


@pytest.mark.skipif(not xla.fast_malloc_environment(), reason="no faster malloc applies here")
def test_the_restart_with_fast_malloc_stops_the_page_faults_of_each_call():
  env = {name: value for name, value in os.environ.items() if name not in xla.MALLOC_VARIABLES}

  def run(**extra_env):
    result = subprocess.run(
        [sys.executable, "-c", MALLOC_SCRIPT, "--flag", "value"],
        capture_output=True,
        text=True,
        env={**env, **extra_env},
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))

  restarted = run()
  # Same arguments after the restart, under the malloc chosen (mimalloc, from its wheel in requirements.txt).
  assert restarted[:3] == (
      xla.fast_malloc_environment(),
      ["--flag", "value"],
      xla.mimalloc_library() is not None,
  )
  # Settings the user made win: no restart, glibc's malloc, and each call faults in the product's 16384 pages.
  users = run(GLIBC_TUNABLES="glibc.malloc.tcache_count=7")
  assert users[:3] == (
      {"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"},
      ["--flag", "value"],
      False,
  )
  assert users[3] > 16384, users
  # mimalloc hands the call the pages of the last one (glibc's huge pages: one fault per 2 MiB); what is
  # left is the rest of the call.
  assert users[3] - restarted[3] > 0.8 * 16384, (restarted, users)


def test_without_mimalloc_glibc_gets_huge_pages(monkeypatch):
  monkeypatch.setattr(xla, "mimalloc_library", lambda: None)
  monkeypatch.setattr(xla, "transparent_huge_pages_on", lambda: True)
  monkeypatch.setattr(xla.platform, "system", lambda: "Linux")
  monkeypatch.setattr(xla.platform, "libc_ver", lambda: ("glibc", "2.36"))
  assert xla.fast_malloc_environment() == {"GLIBC_TUNABLES": xla.HUGE_PAGE_MALLOC}
  monkeypatch.setattr(xla, "transparent_huge_pages_on", lambda: False)
  assert xla.fast_malloc_environment() == {}
  monkeypatch.setattr(xla.platform, "system", lambda: "Darwin")
  assert xla.fast_malloc_environment() == {}


def test_no_malloc_restart_where_jax_computes_on_an_accelerator(monkeypatch):
  """The malloc serves XLA's CPU runtime: a process that will run on a GPU or TPU is not restarted."""
  monkeypatch.setattr(xla, "mimalloc_library", lambda: Path("/lib/libmimalloc.so"))
  monkeypatch.setattr(xla.platform, "system", lambda: "Linux")
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  assert xla.cpu_backend_expected()  # this machine: no accelerator plugin
  assert xla.fast_malloc_environment()["LD_PRELOAD"] == "/lib/libmimalloc.so"
  for platforms, on_cpu in (
      ("cuda", False),
      ("tpu,cpu", False),
      ("cpu", True),
      (" cpu ,cuda", True),
  ):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    assert xla.cpu_backend_expected() == on_cpu
    assert bool(xla.fast_malloc_environment()) == on_cpu
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(xla.importlib.util, "find_spec", lambda name: name == "jax_plugins" or None)
  assert not xla.cpu_backend_expected() and xla.fast_malloc_environment() == {}
