"""Batches transferred to the devices a few steps ahead of the train step, with the consumer's position saved.

  batches = DevicePrefetcher(iter(dataset), functools.partial(meshlib.global_batch, mesh=mesh), size=2)
  host_batch, device_batch = next(batches)  # the numpy batch and its global jax arrays

JAX dispatch is asynchronous, so while the step on batch t runs, batches t+1..t+size are already on their
way to the devices. The underlying iterator has then run `size` batches ahead of the train loop, so its own
state is not the one to checkpoint: the prefetcher records the iterator's state before fetching each queued
batch and reports the one of the oldest batch not yet consumed. Resuming thus continues with exactly the
batch after the last one trained on, for any `size`.

The state is the JSON text grain's Orbax handler writes for a plain DatasetIterator, as bytes (the handler's
format for other iterators), so `grain.checkpoint.CheckpointSave/CheckpointRestore` take the prefetcher as
they take the iterator, and checkpoints written from the plain iterator restore into it.
"""

from __future__ import annotations

import collections
import json
from typing import Any, Callable

import grain


class DevicePrefetcher:
  """Yields (host batch, device batch) pairs, keeping `size` batches transferred ahead (0: none)."""

  def __init__(self, iterator: grain.DatasetIterator, put: Callable[[dict], Any], size: int = 2):
    if size < 0:
      raise ValueError(f"prefetch size {size}; expected >= 0")
    self._iterator, self._put, self._size = iterator, put, size
    # (the iterator's state before this batch, JSON text; host batch; device batch), oldest first.
    self._queue: collections.deque[tuple[str, dict, Any]] = collections.deque()

  def _iterator_state(self) -> str:
    # As grain's handler writes a DatasetIterator's state (and a snapshot: later reads cannot change it).
    return json.dumps(self._iterator.get_state(), indent=4)

  def __iter__(self) -> DevicePrefetcher:
    return self

  def __next__(self) -> tuple[dict, Any]:
    # Filled lazily, so that a restore right after construction transfers nothing twice.
    while len(self._queue) <= self._size:
      state = self._iterator_state()
      try:
        host = next(self._iterator)
      except StopIteration:  # a finite data set: hand out what is queued
        break
      self._queue.append((state, host, self._put(host)))
    if not self._queue:
      raise StopIteration
    _, host, device = self._queue.popleft()
    return host, device

  def get_state(self) -> bytes:
    """Where the consumer stands: the state before the oldest queued batch (or the iterator's own)."""
    return (self._queue[0][0] if self._queue else self._iterator_state()).encode()

  def set_state(self, state: bytes) -> None:
    """Drops the queued batches and moves the iterator to `state` (JSON text, as `get_state` gives or as a
    plain DatasetIterator's checkpoint holds)."""
    self._queue.clear()
    self._iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    """Called by grain's handler after a restore: starts the iterator's own read-ahead (worker processes)."""
    self._iterator.start_prefetch()
