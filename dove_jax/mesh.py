"""Devices: one mesh over every device of every host, a data axis and an fsdp axis.

Batches are split over both axes (fsdp is data parallel too); parameters and optimizer moments are split
over `fsdp` along their largest divisible dimension and replicated over `data`. XLA inserts the collectives.
Evaluation splits its batches the same way, with the weights replicated (`from_host`, `to_host`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
MIN_SHARDED_SIZE = 2**14  # smaller arrays are cheaper replicated than gathered


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all); one of the sizes may be -1 for 'the rest'."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if data == -1:
    data = devices.size // fsdp
  elif fsdp == -1:
    fsdp = devices.size // data
  if data * fsdp != devices.size:
    raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} != {devices.size} devices")
  # Auto axes: the compiler propagates shardings (Explicit axes reject this data-parallel backward pass).
  return Mesh(devices.reshape(data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shards the largest dimension divisible by the fsdp size, if the array is worth it."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp == 0:
      return P(*[("fsdp" if d == dim else None) for d in range(len(shape))])
  return P()


def state_shardings(mesh: Mesh, abstract_state):
  """A NamedSharding for every array of a (train-state) pytree."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp)), abstract_state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """This process's share of the batch -> global arrays split over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def from_host(tree, sharding: NamedSharding):
  """Arrays that every process holds whole, with the same values (a batch every process read, weights) ->
  global arrays laid out by `sharding`; each process places only the pieces its own devices hold."""

  def place(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(place, tree)


def to_host(tree):
  """Global arrays -> whole numpy arrays in every process, gathered from the devices of the others."""

  def fetch(x: jax.Array) -> np.ndarray:
    if x.is_fully_addressable:  # one process, or an array of this process's devices alone
      return np.asarray(x)
    return multihost_utils.process_allgather(x, tiled=True)

  return jax.tree.map(fetch, tree)
