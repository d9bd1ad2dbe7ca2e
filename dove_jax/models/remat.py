"""Rematerialisation: what the backward pass keeps of a block's activations and what it recomputes.

The paper-size model stores ~5 GB of activations per 256 px image for its backward pass, nearly all of it in
the VQ-GAN's full-resolution stages, so a batch of 64 does not fit on one accelerator without remat.
`config.model.remat` picks one policy for every VQ-GAN resnet block and every transformer block:

  "none"          keep everything (fastest; the most memory)
  "save_matmuls"  keep the convolution and matmul outputs, recompute the norms and activations between them
                  (cheap elementwise work recomputed; about half the memory)
  "blocks"        keep only each block's input and recompute the block (about one more forward pass)
"""
from __future__ import annotations

from typing import Callable

import jax
from flax import nnx

_SAVED_BY_MATMUL_POLICY = (jax.lax.dot_general_p, jax.lax.conv_general_dilated_p)


def _save_matmuls(primitive, *_, **__) -> bool:
  return primitive in _SAVED_BY_MATMUL_POLICY


POLICIES = {"none": None, "save_matmuls": _save_matmuls, "blocks": jax.checkpoint_policies.nothing_saveable}


def check(name: str) -> str:
  if name not in POLICIES:
    raise ValueError(f"remat policy {name!r}; expected one of {tuple(POLICIES)}")
  return name


def checkpointed(fn: Callable, name: str, static_argnums: int | tuple[int, ...] = ()) -> Callable:
  """`fn(module, ...)` under nnx.remat with the policy `name`; `fn` itself for "none"."""
  if check(name) == "none":
    return fn
  return nnx.remat(fn, policy=POLICIES[name], static_argnums=static_argnums)
