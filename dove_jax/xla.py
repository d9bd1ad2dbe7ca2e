"""`jax.jit` with the XLA options DOVE runs best under on the backend in use, compiled programs kept across
runs, and a malloc that does not make every CPU call fault in its temporaries again.

On the CPU, jaxlib 0.10 hands convolutions, dots and the elementwise work around them to YNNPACK fusions
by default; on DOVE's convolution stacks those run slower than XLA's own kernels (docs/performance.md), so
they are off. Other backends compile with their defaults.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
import sys
from pathlib import Path

import jax
from jax import monitoring

CPU_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": ""
}  # no YNNPACK fusions: XLA's own CPU kernels
HUGE_PAGE_MALLOC = "glibc.malloc.hugetlb=1"  # glibc: transparent huge pages for its large blocks
MIMALLOC_LIBRARY = "cmeel.prefix/lib/libmimalloc.so"  # in the cmeel-mimalloc wheel
MIMALLOC_OPTIONS = {
    "MIMALLOC_PURGE_DELAY": "-1",  # never return freed memory: the next call reuses it
    "MIMALLOC_ALLOW_LARGE_OS_PAGES": "1",  # transparent huge pages for its arenas
    # Blocks beyond an arena's reach go straight to mmap and back to the OS on free, whatever
    # the purge delay (the paper step's 3.3 GB of temporaries): arenas that hold them.
    "MIMALLOC_ARENA_RESERVE": "8GiB",  # address space, committed as it is touched
    "MIMALLOC_ARENA_MAX_OBJECT_SIZE": "64GiB",
}
MALLOC_VARIABLES = (
    "LD_PRELOAD",
    "GLIBC_TUNABLES",
    *MIMALLOC_OPTIONS,
)  # any one set by the user: no restart
# Where JAX finds a GPU (CUDA, ROCm) or TPU backend: plugins under the jax_plugins namespace or entry point.
ACCELERATOR_MODULES = ("jax_plugins", "libtpu")
TRANSPARENT_HUGE_PAGES = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def compiler_options() -> dict[str, str]:
  return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else {}


def jit(fun=None, **jit_kwargs):
  """`jax.jit(fun, **jit_kwargs)` with `compiler_options()`; usable as a decorator, bare or with keywords."""
  if fun is None:
    return lambda f: jit(f, **jit_kwargs)
  return Jit(fun, jit_kwargs)


class Jit:
  """`jax.jit(fun, compiler_options=compiler_options(), ...)`, made on first use rather than where it is
  defined: asking which backend is in use starts the backend, which in a run of several processes must wait
  for `jax.distributed.initialize`, and a module may define its compiled functions at import. Calls and
  attributes (`lower`, `eval_shape`, ...) go to the jitted function."""

  def __init__(self, fun, jit_kwargs: dict):
    self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, None
    functools.update_wrapper(self, fun)

  @property
  def jitted(self):
    if self._jitted is None:
      self._jitted = jax.jit(self._fun, compiler_options=compiler_options(), **self._jit_kwargs)
    return self._jitted

  def __call__(self, *args, **kwargs):
    return self.jitted(*args, **kwargs)

  def __getattr__(self, name: str):
    if name.startswith("_"):  # not the jitted function's: no recursion before __init__ has run
      raise AttributeError(name)
    return getattr(self.jitted, name)


def cache_compiled_programs(directory: str | Path) -> str:
  """Keeps every compiled program in `directory` (JAX's persistent compilation cache), so that a resumed or
  repeated run loads its parameter initialisers, train step and eval functions instead of compiling them
  again. A cache the user set already (JAX_COMPILATION_CACHE_DIR, or jax.config) is kept, with its settings.
  Returns the directory in use."""
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", str(directory))
    # JAX keeps only programs that took over 1 s; each initialiser takes 0.2-0.4 s, and there are dozens.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return jax.config.jax_compilation_cache_dir


class CompileCounter:
  """`with CompileCounter() as c:` counts the programs XLA builds inside the block (`c.count`, loads from
  the persistent cache included) and how many of them came from that cache (`c.cache_hits`)."""

  COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
  CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

  def __init__(self):
    self.count = 0
    self.cache_hits = 0

  def _on_duration(self, event: str, duration: float, **kwargs):
    self.count += event == self.COMPILE_EVENT

  def _on_event(self, event: str, **kwargs):
    self.cache_hits += event == self.CACHE_HIT_EVENT

  def __enter__(self) -> CompileCounter:
    monitoring.register_event_duration_secs_listener(self._on_duration)
    monitoring.register_event_listener(self._on_event)
    return self

  def __exit__(self, *exc_info):
    monitoring.unregister_event_duration_listener(self._on_duration)
    monitoring.unregister_event_listener(self._on_event)


def transparent_huge_pages_on() -> bool:
  """Whether the kernel gives transparent huge pages to memory that asks for them (`always` or `madvise`)."""
  return TRANSPARENT_HUGE_PAGES.exists() and "[never]" not in TRANSPARENT_HUGE_PAGES.read_text()


def mimalloc_library() -> Path | None:
  """libmimalloc.so from the cmeel-mimalloc wheel (a requirement on Linux), or None where it is missing."""
  try:
    library = Path(importlib.metadata.distribution("cmeel-mimalloc").locate_file(MIMALLOC_LIBRARY))
  except importlib.metadata.PackageNotFoundError:
    return None
  return library if library.exists() else None


def cpu_backend_expected() -> bool:
  """Whether JAX will compute on its CPU backend, told without starting it (the malloc restart comes first):
  JAX_PLATFORMS names cpu first, or it names nothing and no GPU or TPU plugin is installed."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not importlib.metadata.entry_points(group="jax_plugins") and not any(
      importlib.util.find_spec(name) for name in ACCELERATOR_MODULES
  )


def fast_malloc_environment() -> dict[str, str]:
  """The environment variables of the malloc that DOVE's CPU programs run best under (see
  `restart_with_fast_malloc`): mimalloc preloaded and keeping what is freed; without its wheel, glibc's
  huge-page tunable; {} where neither applies (not Linux, no glibc or transparent huge pages for the tunable)
  or where JAX will not compute on the CPU (the malloc serves XLA's CPU runtime alone).
  """
  if platform.system() != "Linux" or not cpu_backend_expected():
    return {}
  library = mimalloc_library()
  if library is not None:
    return {"LD_PRELOAD": str(library), **MIMALLOC_OPTIONS}
  if platform.libc_ver()[0] == "glibc" and transparent_huge_pages_on():
    return {"GLIBC_TUNABLES": HUGE_PAGE_MALLOC}
  return {}


def restart_with_fast_malloc() -> None:
  """Re-executes this process (same interpreter, same arguments) once, with `fast_malloc_environment()`;
  train.py, eval.py and the benchmarks call it first thing.

  XLA's CPU runtime allocates each call's temporaries afresh, as one block, and Eigen's convolutions
  allocate large packing buffers per call. glibc maps blocks that large on malloc and unmaps them on free,
  so every call faults each 4 KiB page in again and the kernel zeroes it. mimalloc, told never to return
  freed memory and to keep even blocks of gigabytes in its arenas, hands the next call the same pages (the
  measurements: docs/performance.md). Without its wheel,
  glibc's `hugetlb=1` tunable (glibc >= 2.35) at least faults once per 2 MiB. A dynamic loader and glibc
  read these variables only at process start, hence the restart. It does nothing when the user set any of
  them already (their settings win) or where none applies.
  """
  if any(name in os.environ for name in MALLOC_VARIABLES):  # the user's, or ours after the restart
    return
  environment = fast_malloc_environment()
  if not environment:
    return
  os.environ.update(environment)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
