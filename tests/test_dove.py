"""The DOVE top module: API shapes, budgets, causality, input checks, no recompiles, weights files."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dove_jax.models.dove import DOVE, Tokens
from dove_jax.tensor_io import ConversionError, param_dict
from dove_jax.weights import load_weights, save_weights

TINY = dict(
    image_size=32,
    vqgan=dict(
        block_out_channels=(16, 16, 32),
        layers_per_block=1,
        latent_channels=8,
        num_vq_embeddings=32,
        vq_embed_dim=8,
        norm_num_groups=8,
        mid_block_attention=False,
    ),
    generator=dict(num_layers=2, d_model=32, num_heads=2, mlp_dim=64),
    decoder=dict(num_layers=2, d_model=32, num_heads=2, mlp_dim=64),
    max_tokens=16,
)


def tiny_dove(seed=0, **overrides):
  return DOVE(**{**TINY, **overrides}, rngs=nnx.Rngs(seed))


def images(batch=2, size=32, seed=0):
  return jax.random.uniform(jax.random.key(seed), (batch, size, size, 3), minval=-1.0, maxval=1.0)


@pytest.fixture(scope="module")
def model():
  return tiny_dove()


@pytest.fixture(scope="module")
def jitted(model):
  """encode/decode/forward under jax.jit over the split state: the functional pattern the trainer uses."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def encode(state, x, budget):
    return nnx.merge(graphdef, state).encode(x, budget)

  @jax.jit
  def decode(state, tokens):
    return nnx.merge(graphdef, state).decode(tokens)

  return state, encode, decode


def test_encode_decode_shapes_and_types(model):
  tokens = model.encode(images())
  assert isinstance(tokens, Tokens)
  assert tokens.tokens.shape == (2, 16, 32) and tokens.mask.shape == (2, 16)
  assert tokens.lengths.shape == (2,) and tokens.lengths.dtype == jnp.int32
  assert tokens.eos_prob.shape == (2, 16) and tokens.eos_prob.dtype == jnp.float32
  # The negative EOS bias makes a fresh model use every slot.
  np.testing.assert_array_equal(tokens.lengths, [16, 16])
  out = model(images())
  assert out.reconstruction.shape == (2, 32, 32, 3)
  assert out.features.shape == out.latents.shape == (2, 8, 8, 8)
  np.testing.assert_allclose(model.decode(out.tokens), out.reconstruction, atol=1e-6)


def test_budget_sets_lengths_and_zeroes_the_rest(model):
  tokens = model.encode(images(batch=3), token_budget=jnp.asarray([1, 5, 0]))
  np.testing.assert_array_equal(tokens.lengths, [1, 5, 16])
  np.testing.assert_array_equal(np.asarray(tokens.tokens)[0, 1:], 0.0)
  np.testing.assert_array_equal(np.asarray(tokens.tokens)[1, 5:], 0.0)
  assert np.all(np.abs(np.asarray(tokens.tokens)[1, :5]).sum(-1) > 0)


def test_shorter_budget_is_a_prefix_of_the_longer(model):
  """Causal generation: the first k tokens do not depend on the budget."""
  x = images()
  full, short = model.encode(x), model.encode(x, token_budget=4)
  np.testing.assert_allclose(short.tokens[:, :4], full.tokens[:, :4], atol=1e-6)


def test_generator_slot_i_ignores_later_slot_inputs(model):
  gen = model.generator
  features = jax.random.normal(jax.random.key(1), (2, 64, 8))
  x, positions, key_mask = gen.inputs(features)
  tokens, eos_prob = gen.outputs(x, positions, key_mask)
  i = 6  # slot index (0-based) inside the n slots; perturb every input after it
  start = x.shape[1] - gen.max_tokens
  x2 = x.at[:, start + i + 1 :].add(
      jax.random.normal(jax.random.key(2), x[:, start + i + 1 :].shape)
  )
  tokens2, eos2 = gen.outputs(x2, positions, key_mask)
  np.testing.assert_allclose(tokens2[:, : i + 1], tokens[:, : i + 1], atol=1e-5)
  np.testing.assert_allclose(eos2[:, : i + 1], eos_prob[:, : i + 1], atol=1e-6)
  assert not np.allclose(
      tokens2[:, i + 1 :], tokens[:, i + 1 :], atol=1e-3
  )  # later slots did change


def test_decoder_ignores_what_lies_in_dropped_slots(model):
  tokens = model.encode(images(), token_budget=6)
  noisy = tokens.replace(tokens=tokens.tokens.at[:, 6:].set(123.0))
  np.testing.assert_allclose(model.decode(noisy), model.decode(tokens), atol=1e-5)


def test_no_recompile_for_new_budgets_or_lengths(jitted, count_compiles):
  state, encode, decode = jitted
  x = images()
  decode(state, encode(state, x, jnp.asarray([0, 0])))  # compile both once
  budgets = [jnp.asarray(b, jnp.int32) for b in ([3, 9], [16, 1], [0, 7], [2, 0])]
  with count_compiles() as c:
    lengths = [np.asarray(decode(state, encode(state, x, b)).shape) for b in budgets]
  assert c.count == 0, f"{c.count} recompilations for new budgets"
  assert len(lengths) == 4


def test_jit_matches_eager(model, jitted):
  state, encode, decode = jitted
  x = images()
  budget = jnp.asarray([3, 0])
  np.testing.assert_allclose(
      decode(state, encode(state, x, budget)), model.decode(model.encode(x, budget)), atol=1e-5
  )


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((32, 32, 3), np.float32), "NHWC"),
        (np.zeros((2, 3, 32, 32), np.float32), "NHWC"),
        (np.zeros((2, 64, 64, 3), np.float32), "32x32"),
        (np.zeros((2, 32, 32, 3), np.uint8), "dtype uint8"),
        (np.full((2, 32, 32, 3), 255.0, np.float32), r"\[-1, 1\]"),
    ],
)
def test_bad_images_get_a_clear_error(model, bad, message):
  with pytest.raises(ValueError, match=message):
    model.encode(jnp.asarray(bad))


def test_image_size_must_fit_the_vqgan():
  with pytest.raises(ValueError, match="multiple of the VQGAN's downsampling 4"):
    tiny_dove(image_size=30)


def test_unknown_transformer_preset():
  with pytest.raises(ValueError, match="unknown transformer preset 'pythia-1b'"):
    tiny_dove(generator="pythia-1b")


def test_weights_round_trip(tmp_path, model):
  path = tmp_path / "dove.safetensors"
  save_weights(model, path)
  other = tiny_dove(seed=1)
  x = images()
  assert not np.allclose(other(x).reconstruction, model(x).reconstruction)
  report = load_weights(other, path)
  assert report.converted == len(param_dict(model))
  np.testing.assert_array_equal(other(x).reconstruction, model(x).reconstruction)


def test_weights_of_another_shape_name_the_parameter_and_both_shapes(tmp_path, model):
  path = tmp_path / "dove.safetensors"
  save_weights(model, path)
  wider = tiny_dove(decoder=dict(num_layers=2, d_model=48, num_heads=2, mlp_dim=64))
  with pytest.raises(ConversionError) as err:
    load_weights(wider, path)
  assert (
      "parameter token_decoder/latent_queries: checkpoint shape (64, 32) != model shape (64, 48)"
      in str(err.value)
  )
  deeper = tiny_dove(generator=dict(num_layers=3, d_model=32, num_heads=2, mlp_dim=64))
  with pytest.raises(ConversionError, match="checkpoint lacks generator/transformer/layers/2/"):
    load_weights(deeper, path)


def test_bfloat16_compute_keeps_float32_params():
  """bf16 convolutions and matmuls (what a GPU trains in) on float32 parameters, float32 outputs, close to
  the float32 model's."""
  model, full = tiny_dove(dtype="bfloat16"), tiny_dove()
  assert all(v.dtype == jnp.float32 for v in param_dict(model).values())
  out, expected = model(images(), token_budget=8), full(images(), token_budget=8)
  assert out.reconstruction.dtype == out.features.dtype == out.tokens.tokens.dtype == jnp.float32
  scale = np.abs(expected.reconstruction).max()
  assert np.abs(out.reconstruction - expected.reconstruction).max() < 0.05 * scale
  graphdef, state = nnx.split(model)
  program = (
      jax.jit(lambda s: nnx.merge(graphdef, s)(images()).reconstruction).lower(state).as_text()
  )
  convolutions = re.findall(r"stablehlo.convolution.*", program)
  signatures = [c.split(" : ")[-1] for c in convolutions]  # (tensor<...xbf16>, ...) -> tensor<...>
  assert signatures and all("bf16" in t and "f32" not in t for t in signatures), signatures


def test_paper_size_parameter_counts():
  """The paper's model, shapes only (nnx.eval_shape allocates nothing)."""
  paper = nnx.eval_shape(lambda: DOVE(rngs=nnx.Rngs(0)))

  def count(module):
    return sum(int(np.prod(v.shape)) for v in param_dict(module).values())

  counts = {name: count(getattr(paper, name)) for name in ("vqgan", "generator", "token_decoder")}
  print("paper-size DOVE parameters:", counts, "total", count(paper))
  assert (
      counts["vqgan"] == 146_244_675
  )  # diffusers VQModel, aMUSEd config (tests/test_vqgan.py checks it)
  # Pythia-70M without its token embedding: 70,426,624 - 2 x 50,304 x 512 (embed_in, embed_out).
  assert count(paper.generator.transformer) == count(paper.token_decoder.transformer) == 18_915_328
  # feature projection, feature positions (16 x 16 cells), EOS head
  assert counts["generator"] - 18_915_328 == 64 * 512 + 512 + 256 * 512 + 512 + 1
  assert counts["token_decoder"] - 18_915_328 == 512 * 512 + 512 + 256 * 512 + 512 * 64 + 64


def remat_blocks(policy: str) -> dict:
  """A VQ-GAN stage and a transformer built with the remat `policy`, each with an input."""
  from dove_jax.models.neox import NeoXTransformer
  from dove_jax.models.vqgan import Stage

  rngs, key = nnx.Rngs(0), jax.random.key(1)
  stage = Stage(8, 16, num_layers=2, resample=None, norm_num_groups=8, remat=policy, rngs=rngs)
  transformer = NeoXTransformer(
      num_layers=2, d_model=16, num_heads=2, mlp_dim=32, causal=True, remat=policy, rngs=rngs
  )
  return {
      "vqgan stage": (stage, jax.random.normal(key, (2, 8, 8, 8))),  # [B, H, W, C]
      "transformer": (transformer, jax.random.normal(key, (2, 8, 16))),
  }  # [B, L, D]


def test_remat_policies_give_the_same_gradients_and_recompute_what_they_say():
  gradients, counts = {}, {}
  for policy in ("none", "save_matmuls", "blocks"):
    for name, (module, x) in remat_blocks(policy).items():
      graphdef, params = nnx.split(module)
      loss = lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p)(x)))
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
      gradients[policy, name] = compiled(params, x)
      text = compiled.as_text()
      counts[policy, name] = text.count(" convolution(") + text.count(" dot(")
  for (policy, name), grads in gradients.items():
    for a, b in zip(jax.tree.leaves(gradients["none", name]), jax.tree.leaves(grads)):
      np.testing.assert_allclose(a, b, atol=1e-6, err_msg=f"{policy} {name}")
  for name in ("vqgan stage", "transformer"):
    # "save_matmuls" keeps every convolution's and matmul's output (recomputing only norms and
    # activations); "blocks" recomputes the blocks' convolutions and matmuls in the backward pass.
    assert counts["save_matmuls", name] == counts["none", name] < counts["blocks", name], name


def test_dove_hands_its_remat_policy_to_every_block():
  model = nnx.eval_shape(lambda: tiny_dove(remat="blocks"))
  vqgan = model.vqgan
  holders = [
      *vqgan.encoder.down_blocks,
      vqgan.encoder.mid_block,
      *vqgan.decoder.up_blocks,
      vqgan.decoder.mid_block,
      model.generator.transformer,
      model.token_decoder.transformer,
  ]
  assert [holder.remat for holder in holders] == ["blocks"] * len(holders)


def test_unknown_remat_policy_is_named():
  with pytest.raises(ValueError, match="remat policy 'all'; expected one of"):
    tiny_dove(remat="all")


def test_grid_encoding_tells_every_cell_apart():
  from dove_jax.models.embeddings import grid_encoding, timestep_encoding

  enc = grid_encoding(16, 64)  # [256, 64]
  assert enc.shape == (256, 64)
  distances = np.linalg.norm(enc[:, None] - enc[None], axis=-1)
  assert np.min(distances + np.eye(256) * 1e9) > 0.1  # no two cells share an encoding
  np.testing.assert_allclose(enc[17, :32], enc[16, :32])  # cells 16 and 17 share row 1 ...
  assert not np.allclose(enc[17, 32:], enc[16, 32:])  # ... but not the column
  np.testing.assert_allclose(
      timestep_encoding(3, 4),
      [
          [np.sin(1), np.sin(0.01), np.cos(1), np.cos(0.01)],
          [np.sin(2), np.sin(0.02), np.cos(2), np.cos(0.02)],
          [np.sin(3), np.sin(0.03), np.cos(3), np.cos(0.03)],
      ],
      rtol=1e-6,
  )
