"""`jax.jit` with the XLA options DOVE runs best under on the backend in use.

On the CPU, jaxlib 0.10 hands convolutions, dots and the elementwise work around them to YNNPACK fusions
by default; on DOVE's convolution stacks those run 1.5-2x slower than XLA's own kernels (the tiny VQ-GAN
encoder: forward 17 -> 9 ms, gradient 51 -> 36 ms at batch 8; docs/performance.md), so they are off. Other
backends compile with their defaults.
"""
from __future__ import annotations

import jax

CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}  # no YNNPACK fusions: XLA's own CPU kernels


def compiler_options() -> dict[str, str]:
  return dict(CPU_OPTIONS) if jax.default_backend() == "cpu" else {}


def jit(fun=None, **jit_kwargs):
  """`jax.jit(fun, **jit_kwargs)` with `compiler_options()`; usable as a decorator, bare or with keywords."""
  if fun is None:
    return lambda f: jit(f, **jit_kwargs)
  return jax.jit(fun, compiler_options=compiler_options(), **jit_kwargs)
