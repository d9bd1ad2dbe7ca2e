"""Portable export: encode and decode serialized with `jax.export` into a model folder run with jax
alone (a fresh process that never imports dove_jax or flax), at any batch size from the same files,
and give what the model itself gives."""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from dove_jax import DOVE, portable, save_pretrained
from test_dove import TINY

# Four images: the fresh process encodes the first alone and the other three together.
BUDGETS = np.array([0, 3, 0, 40], np.int32)  # predicted, forced, predicted, more than n
IMAGES = np.asarray(jax.random.uniform(jax.random.key(1), (4, 32, 32, 3), minval=-1.0, maxval=1.0))

# Loads dove_jax/portable.py as a file (the package is never imported) and runs its loader.
LOAD_AND_RUN = textwrap.dedent("""
    import importlib.util, sys
    import numpy as np
    portable_py, folder, inputs, outputs = sys.argv[1:]
    spec = importlib.util.spec_from_file_location("portable", portable_py)
    portable = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(portable)
    encode, decode = portable.load_portable(folder)
    inputs = np.load(inputs)
    results = {}
    for name, batch in (("one", slice(0, 1)), ("three", slice(1, 4))):
      tokens, mask, lengths = encode(inputs["images"][batch], inputs["budgets"][batch])
      results.update({f"{name}_tokens": tokens, f"{name}_mask": mask, f"{name}_lengths": lengths})
      results[f"{name}_images"] = decode(tokens, mask)
    np.savez(outputs, **results)
    imported = {name.split(".")[0] for name in sys.modules}
    assert not imported & {"dove_jax", "flax"}, sorted(imported & {"dove_jax", "flax"})
""")


@pytest.fixture(scope="module")
def model():
  # No negative EOS bias: the first slot's EOS fires (p ~ 0.65), so a predicted length is 1, not 16.
  return DOVE(**TINY, eos_bias_init=0.0, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def folder(model, tmp_path_factory):
  directory = tmp_path_factory.mktemp("dove")
  save_pretrained(model, directory)
  portable.export_portable(model, directory)
  return directory


def test_the_folder_runs_with_jax_alone_at_any_batch_size(model, folder, tmp_path):
  np.savez(tmp_path / "inputs.npz", images=IMAGES, budgets=BUDGETS)
  result = subprocess.run(
      [sys.executable, "-c", LOAD_AND_RUN, portable.__file__, folder, tmp_path / "inputs.npz"]
      + [tmp_path / "outputs.npz"],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  outputs = np.load(tmp_path / "outputs.npz")
  expected = nnx.jit(DOVE.encode)(model, IMAGES, BUDGETS)
  reconstructions = nnx.jit(DOVE.decode)(model, expected)
  assert expected.lengths.tolist() == [1, 3, 1, 16]  # predicted, forced, predicted, capped at n
  for name, batch in (("one", slice(0, 1)), ("three", slice(1, 4))):
    np.testing.assert_allclose(outputs[f"{name}_tokens"], expected.tokens[batch], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(outputs[f"{name}_mask"], expected.mask[batch])
    np.testing.assert_array_equal(outputs[f"{name}_lengths"], expected.lengths[batch])
    np.testing.assert_allclose(outputs[f"{name}_images"], reconstructions[batch], rtol=0, atol=1e-5)


def test_portable_json_describes_the_functions(folder):
  config = json.loads((folder / portable.PORTABLE_CONFIG).read_text())
  assert config["encode"] == {
      "arguments": {"images": "float32[b,32,32,3]", "token_budget": "int32[b]"},
      "results": {"tokens": "float32[b,16,32]", "mask": "bool[b,16]", "lengths": "int32[b]"},
  }
  assert config["decode"]["arguments"] == {"tokens": "float32[b,16,32]", "mask": "bool[b,16]"}
  assert config["platforms"] == ["cpu", "cuda"] and config["jax_version"] == jax.__version__
  assert config["query_length"] is None
  for name in (portable.ENCODE_FILE, portable.DECODE_FILE):
    assert jax.export.deserialize((folder / name).read_bytes()).platforms == ("cpu", "cuda")


def test_each_platform_gets_its_own_kernels(model, tmp_path):
  """The CPU's kernels (here the norms' grouped sums, behind an optimisation barrier) in the CPU program
  only; the CUDA program is plain XLA (dove_jax/models/kernels.py)."""
  programs = {}
  for platform in ("cpu", "cuda"):
    portable.export_portable(model, tmp_path / platform, platforms=(platform,))
    exported = (tmp_path / platform / portable.DECODE_FILE).read_bytes()
    programs[platform] = jax.export.deserialize(exported).mlir_module()
  assert "optimization_barrier" in programs["cpu"]
  assert "optimization_barrier" not in programs["cuda"]


def test_a_wrong_shape_is_refused_naming_it(folder):
  encode, _ = portable.load_portable(folder)
  with pytest.raises(
      ValueError, match=r"expected \(b, 32, 32, 3\) and called with \(2, 16, 16, 3\)"
  ):
    encode(np.zeros((2, 16, 16, 3), np.float32), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match=r"args\[2\].shape\[0\] \(= 3\).*'b' \(= 2\)"):
    encode(IMAGES[:2], np.zeros(3, np.int32))


def test_a_qdove_encodes_with_its_query(tmp_path):
  model = DOVE(**TINY, eos_bias_init=0.0, query_vocab_size=20, rngs=nnx.Rngs(2))
  save_pretrained(model, tmp_path)
  config = portable.export_portable(model, tmp_path, query_length=5)
  assert config["query_length"] == 5
  assert config["encode"]["arguments"]["query_mask"] == "bool[b,5]"
  encode, _ = portable.load_portable(tmp_path)
  query = np.array([[3, 4, 7, 0, 0], [0, 0, 0, 0, 0], [1, 2, 3, 4, 5]], np.int32)
  query_mask = np.array(
      [[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool
  )  # row 2: no query
  tokens, mask, lengths = encode(IMAGES[:3], BUDGETS[:3], query, query_mask)
  expected = nnx.jit(DOVE.encode)(model, IMAGES[:3], BUDGETS[:3], query, query_mask)
  np.testing.assert_allclose(tokens, expected.tokens, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(mask, expected.mask)
  np.testing.assert_array_equal(lengths, expected.lengths)
