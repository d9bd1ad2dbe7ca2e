"""One folder per model: `save_pretrained` writes config.json and model.safetensors, `DOVE.from_pretrained`
rebuilds the same model from them alone, and a folder whose config and tensors disagree is refused naming
the parameter and both shapes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dove_jax import DOVE, save_pretrained
from test_dove import TINY


@pytest.fixture(scope="module")
def model():
  # Narrower tokens, a Q-DOVE and a dtype: arguments beyond the defaults must survive the round trip.
  return DOVE(**TINY, token_dim=8, query_vocab_size=20, dtype="bfloat16", rngs=nnx.Rngs(3))


def test_a_saved_folder_rebuilds_the_same_model(model, tmp_path):
  assert save_pretrained(model, tmp_path / "dove") == len(
      jax.tree.leaves(nnx.state(model, nnx.Param))
  )
  config = json.loads((tmp_path / "dove" / "config.json").read_text())
  assert config["model"]["token_dim"] == 8 and config["model"]["dtype"] == "bfloat16"
  assert {"dove-jax", "jax", "flax"} <= set(config["versions"])
  loaded = DOVE.from_pretrained(tmp_path / "dove")
  for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(a, b)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  query, mask = jnp.array([[3, 4, 0]] * 2), jnp.array([[True, True, False]] * 2)
  expected = model.decode(model.encode(images, 5, query, mask))
  np.testing.assert_array_equal(loaded.decode(loaded.encode(images, 5, query, mask)), expected)


def test_a_folder_whose_config_and_tensors_disagree_is_refused(model, tmp_path):
  save_pretrained(model, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["model"]["token_dim"] = 4
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"generator/token_out/kernel.*\(32, [48]\).*\(32, [48]\)"):
    DOVE.from_pretrained(tmp_path)
  (tmp_path / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="config.json not found: not a model folder"):
    DOVE.from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["dove", "qdove"])
def test_the_shipped_folders_hold_the_tiny_presets_models(name):
  """weights/tiny/dove and qdove (whose model.safetensors link to the shipped weights files) describe the
  tiny presets' models, and load to the weights those files hold."""
  from configs import dove, qdove
  from dove_jax import load_weights
  from dove_jax.weights import shaped_model

  preset = (dove if name == "dove" else qdove).get_config("tiny")
  loaded = DOVE.from_pretrained(dove.SHIPPED / "tiny" / name)
  expected = shaped_model(lambda: DOVE(**preset.model, rngs=nnx.Rngs(0)))
  assert json.loads(loaded.arguments) == json.loads(expected.arguments)
  load_weights(expected, dove.SHIPPED / "tiny" / f"{name}.safetensors")
  for a, b in zip(jax.tree.leaves(nnx.state(expected)), jax.tree.leaves(nnx.state(loaded))):
    np.testing.assert_array_equal(a, b)
