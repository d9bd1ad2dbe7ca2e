"""The staged recipe: a VQ-GAN trained alone (stage 1) loaded into DOVE (stage 2), frozen parameters as
constants of the loss, and the stage-1 objective's train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dove_jax.convert.pretrained import is_own_weights, load_pretrained
from dove_jax.tensor_io import ConversionError, param_dict
from dove_jax.training.step import constants_under
from dove_jax.weights import save_weights
from test_dove import TINY, tiny_dove


def values(model, prefix):
  return {
      name: np.asarray(var[...])
      for name, var in param_dict(model).items()
      if name.startswith(prefix)
  }


@pytest.mark.parametrize("part", ["vqgan", ""])
def test_our_vqgan_weights_fill_the_vqgan_and_nothing_else(tmp_path, part):
  trained, path = tiny_dove(seed=1), tmp_path / "weights.safetensors"
  save_weights(
      trained, path, part=part
  )  # a stage-1 export, or a whole DOVE whose transformers stay aside
  assert is_own_weights(path)
  model = tiny_dove(seed=2)
  before = values(model, "generator/")
  load_pretrained(model, vqgan=path)
  for name, value in values(trained, "vqgan/").items():
    np.testing.assert_array_equal(values(model, "vqgan/")[name], value)
  for name, value in values(model, "generator/").items():
    np.testing.assert_array_equal(value, before[name])


def test_a_vqgan_file_of_another_config_names_the_parameter(tmp_path):
  path = tmp_path / "vqgan.safetensors"
  save_weights(
      tiny_dove(
          seed=1,
          vqgan={**TINY["vqgan"], "num_vq_embeddings": 64},  # twice the codes
      ),
      path,
      part="vqgan",
  )
  with pytest.raises(
      ConversionError,
      match=r"parameter quantizer/embedding: checkpoint shape \(64, 8\) != model "
      r"shape \(32, 8\)",
  ):
    load_pretrained(tiny_dove(seed=2), vqgan=path)


def test_export_of_a_missing_part_is_refused(tmp_path):
  with pytest.raises(ValueError, match="no parameter under 'vqgam'"):
    save_weights(tiny_dove(), tmp_path / "x.safetensors", part="vqgam")


def test_frozen_parameters_get_no_gradient_and_the_rest_do():
  _, params = nnx.split(tiny_dove(), nnx.Param)
  images = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3), minval=-1, maxval=1)
  graphdef = nnx.graphdef(tiny_dove())

  def loss(params, frozen):
    model = nnx.merge(graphdef, constants_under(params, frozen))
    return jnp.mean(jnp.square(model(images, 8).reconstruction - images))

  grad = jax.jit(jax.grad(loss), static_argnums=1)  # compiled: op by op, the backward takes ~30 s
  frozen_grads, free_grads = grad(params, ("vqgan",)), grad(params, ())
  for path, grad in jax.tree_util.tree_flatten_with_path(frozen_grads)[0]:
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if name.startswith("vqgan/") and not name.startswith("vqgan/quantizer"):
      assert not np.any(np.asarray(grad)), name
  # What is not frozen gets the gradient it would get with nothing frozen.
  np.testing.assert_allclose(
      frozen_grads["generator"]["feature_proj"]["kernel"][...],
      free_grads["generator"]["feature_proj"]["kernel"][...],
      rtol=1e-5,
      atol=1e-7,
  )
  assert np.any(np.asarray(frozen_grads["token_decoder"]["latent_out"]["kernel"][...]))
