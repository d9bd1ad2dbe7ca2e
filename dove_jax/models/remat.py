"""Rematerialisation: what the backward pass keeps of a block's activations and what it recomputes.

The paper-size model keeps over a gigabyte of activations per 256 px image for its backward pass (the VQ-GAN
encoder's gradient alone: 733 MiB of XLA temporaries), nearly all in the VQ-GAN's full-resolution stages, so
a large batch needs remat on an accelerator. `config.model.remat` picks one policy for every VQ-GAN resnet
block and every transformer block:

  "none"          keep everything (the least compute)
  "save_matmuls"  keep the convolution and matmul outputs, recompute the norms and activations between them
                  (only elementwise work is recomputed)
  "blocks"        keep only each block's input and recompute the whole block (one more forward pass of it)

On the CPU, XLA's default scheduler keeps about as much under every policy (docs/performance.md has the
figures); the policies are meant for accelerators, where no measurement has been made yet.
"""

from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

_SAVED_BY_MATMUL_POLICY = (jax.lax.dot_general_p, jax.lax.conv_general_dilated_p)


def _save_matmuls(primitive, *_, **__) -> bool:
  return primitive in _SAVED_BY_MATMUL_POLICY


POLICIES = {
    "none": None,
    "save_matmuls": _save_matmuls,
    "blocks": jax.checkpoint_policies.nothing_saveable,
}


def check(name: str) -> str:
  if name not in POLICIES:
    raise ValueError(f"remat policy {name!r}; expected one of {tuple(POLICIES)}")
  return name


def checkpointed(fn: Callable, name: str, static_argnums: int | tuple[int, ...] = ()) -> Callable:
  """`fn(module, ...)` under nnx.remat with the policy `name`; `fn` itself for "none"."""
  if check(name) == "none":
    return fn
  return nnx.remat(fn, policy=POLICIES[name], static_argnums=static_argnums)
