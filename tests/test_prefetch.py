"""The device prefetcher: same batches in the same order, on the mesh, and checkpoints at the consumer's position."""

import functools
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dove_jax import mesh as meshlib
from dove_jax.data import pipeline
from dove_jax.data.prefetch import DevicePrefetcher
from dove_jax.training import checkpoint

BATCHES = 12  # two epochs of 6 batches: the resumes below cross an epoch boundary


def numbered_dataset():
  """Batches of 4 of 24 numbered records (label = index), reshuffled every epoch, forever."""
  source = [{"image": np.full((8, 8, 3), i, np.uint8), "label": i} for i in range(24)]
  return pipeline.make_dataset(source, image_size=8, global_batch_size=4, seed=0, train=True)


@pytest.fixture(scope="module")
def mesh():
  return meshlib.make_mesh(1, 1, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def expected():
  """The plain sequential read."""
  return list(itertools.islice(numbered_dataset(), BATCHES))


class CountingPut:
  """global_batch onto `mesh`, counting the batches transferred."""

  def __init__(self, mesh):
    self.put, self.count = functools.partial(meshlib.global_batch, mesh=mesh), 0

  def __call__(self, batch: dict) -> dict:
    self.count += 1
    return self.put(batch)


def prefetcher(mesh, size: int, iterator=None) -> DevicePrefetcher:
  return DevicePrefetcher(
      iter(numbered_dataset()) if iterator is None else iterator, CountingPut(mesh), size
  )


def assert_same(batch: dict, reference: dict):
  assert batch.keys() == reference.keys()
  for key in batch:
    np.testing.assert_array_equal(np.asarray(batch[key]), reference[key], err_msg=key)


def assert_continues_at(batches: DevicePrefetcher, expected: list[dict], k: int):
  """The next batches are the sequential read's batches k, k+1, ..."""
  for reference in expected[k:]:
    host, device = next(batches)
    assert_same(host, reference)
    assert_same(device, reference)


@pytest.mark.parametrize("size", [0, 1, 3])
def test_same_batches_in_order_on_the_mesh_and_size_ahead(mesh, expected, size):
  batches = prefetcher(mesh, size)
  assert batches._put.count == 0  # nothing is read before the first batch is asked for
  for k, reference in enumerate(expected, 1):
    host, device = next(batches)
    assert_same(host, reference)
    assert_same(device, reference)
    assert all(
        isinstance(x, jax.Array) and x.sharding == meshlib.batch_sharding(mesh)
        for x in device.values()
    )
    assert batches._put.count == k + size


def test_a_finite_iterator_ends_after_its_last_batch(mesh):
  source = [{"image": np.zeros((8, 8, 3), np.uint8), "label": i} for i in range(10)]
  dataset = pipeline.make_dataset(source, image_size=8, global_batch_size=4, seed=0, train=False)
  batches = DevicePrefetcher(iter(dataset), CountingPut(mesh), 3)
  labels = [host["label"].tolist() for host, _ in batches]
  assert labels == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 0]]  # the last one padded


@pytest.mark.parametrize("k", [0, 4, 7])
def test_state_is_the_consumers_position(mesh, expected, k):
  batches = prefetcher(mesh, 3)
  plain = iter(numbered_dataset())
  for _ in range(k):
    next(batches), next(plain)
  state = batches.get_state()
  assert json.loads(state) == plain.get_state()  # not the read-ahead iterator's state
  next(batches)
  restored = prefetcher(mesh, 3)
  restored.set_state(state)
  assert restored._put.count == 0
  assert_continues_at(restored, expected, k)
  batches.set_state(state)  # set_state also drops what was queued
  assert_continues_at(batches, expected, k)


def checkpointer(directory):
  return checkpoint.Checkpointer(directory, every_steps=1, keep=2)


def train_state(mesh):
  """A stand-in for the train state in the composite checkpoint, and its abstract form for restoring."""
  state = {"step": jnp.int32(5)}
  return state, checkpoint.abstract_like(state, {"step": meshlib.replicated(mesh)})


@pytest.mark.parametrize(
    "saved_from", ["prefetcher", "plain iterator"]
)  # the latter: checkpoints of old runs
def test_checkpoint_restores_the_consumers_position(mesh, expected, tmp_path, saved_from):
  k = 4
  batches = prefetcher(mesh, 3) if saved_from == "prefetcher" else iter(numbered_dataset())
  for _ in range(k):
    next(batches)
  state, abstract = train_state(mesh)
  ckpt = checkpointer(tmp_path)
  assert ckpt.save(k, state, batches, force=True)
  next(batches)  # the iterator's state was taken at save time
  ckpt.close()
  written = json.loads(next((tmp_path / str(k) / "data").glob("process_*.json")).read_text())
  plain = iter(numbered_dataset())
  for _ in range(k):
    next(plain)
  assert written == plain.get_state()  # the same file either way

  restored = prefetcher(mesh, 3)
  ckpt = checkpointer(tmp_path)
  assert int(ckpt.restore(abstract, restored)["step"]) == 5
  ckpt.close()
  assert restored._put.count == 0
  assert_continues_at(restored, expected, k)
