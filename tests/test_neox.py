"""NeoXTransformer against transformers' GPTNeoXModel, through a saved Hugging Face folder and load_pythia."""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXModel

from dove_jax.convert.neox import check_neox_config, load_pythia, read_embed_in
from dove_jax.models.neox import PYTHIA_14M, PYTHIA_70M, NeoXTransformer
from dove_jax.tensor_io import ConversionError, param_dict, read_tensors

BATCH, LENGTH, VOCAB = 2, 40, 64


def hf_config(**overrides) -> GPTNeoXConfig:
  kwargs = dict(
      hidden_size=128,
      num_hidden_layers=6,
      num_attention_heads=4,
      intermediate_size=512,
      rotary_pct=0.25,
      rotary_emb_base=10000,
      layer_norm_eps=1e-5,
      use_parallel_residual=True,
      hidden_act="gelu",
      max_position_embeddings=64,
      vocab_size=VOCAB,
  )
  return GPTNeoXConfig(**{**kwargs, **overrides})


@pytest.fixture(scope="module")
def pythia(tmp_path_factory):
  """A Pythia-14M-shaped GPTNeoXForCausalLM with random weights, saved as a Hugging Face folder.

  Weights are larger than the 0.02 init so attention is far from uniform (rotary errors show), and the
  LayerNorm weights/biases move away from 1/0 so a swapped scale and bias would show.
  """
  torch.manual_seed(0)
  lm = GPTNeoXForCausalLM(hf_config()).eval()
  with torch.no_grad():
    for name, p in lm.named_parameters():
      if "layernorm" in name or "layer_norm" in name:
        p.copy_(
            1.0 + 0.2 * torch.randn_like(p)
            if name.endswith("weight")
            else 0.1 * torch.randn_like(p)
        )
      else:
        p.normal_(0.0, 0.08)
  folder = tmp_path_factory.mktemp("pythia-14m")
  lm.save_pretrained(folder)
  return lm.gpt_neox, folder


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, x, positions, key_mask):
  return nnx.merge(graphdef, state)(x, positions, key_mask)


def run(model: NeoXTransformer, x, positions=None, key_mask=None) -> np.ndarray:
  """Runs the model under plain jax.jit through nnx.split/merge, the way a train step does."""
  graphdef, state = nnx.split(model)
  with jax.default_matmul_precision("highest"):
    return np.asarray(_forward(graphdef, state, jnp.asarray(x), positions, key_mask))


def converted(folder, *, causal: bool) -> NeoXTransformer:
  model = NeoXTransformer(**PYTHIA_14M, causal=causal, rngs=nnx.Rngs(1))
  print(load_pythia(model, folder))
  return model


def random_embeds(seed: int, length: int = LENGTH) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((BATCH, length, 128)).astype(np.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_matches_transformers(pythia, causal):
  reference, folder = pythia
  x = random_embeds(0)
  # A 4D mask is used as-is by transformers' create_causal_mask; an all-zero additive mask makes SDPA attend
  # everywhere (it only applies is_causal when no mask is given): GPT-NeoX with the causal mask removed.
  mask = None if causal else torch.zeros(BATCH, 1, LENGTH, LENGTH)
  with torch.no_grad():
    expected = reference(
        inputs_embeds=torch.from_numpy(x), attention_mask=mask
    ).last_hidden_state.numpy()
    causal_expected = reference(inputs_embeds=torch.from_numpy(x)).last_hidden_state.numpy()
  if not causal:  # the reference really is bidirectional: early positions see later inputs
    assert np.abs(expected[:, 0] - causal_expected[:, 0]).max() > 1e-2
  ours = run(converted(folder, causal=causal), x)
  diff = np.abs(ours - expected).max()
  print(f"causal={causal}: max abs diff {diff:.2e}, output scale {np.abs(expected).max():.2f}")
  assert diff <= 1e-4


def test_causality(pythia):
  _, folder = pythia
  model = converted(folder, causal=True)
  x = random_embeds(1)
  changed = x.copy()
  changed[:, 25:] = random_embeds(2)[:, 25:]
  before, after = run(model, x), run(model, changed)
  np.testing.assert_allclose(after[:, :25], before[:, :25], atol=1e-6)
  assert np.abs(after[:, 25:] - before[:, 25:]).max() > 1e-2


@pytest.mark.parametrize("causal", [False, True])
def test_padding_is_invisible(pythia, causal):
  """Row 1 holds the 28 inputs of row 0 after 12 padded slots; positions skip the padding."""
  _, folder = pythia
  model = converted(folder, causal=causal)
  pad, valid = 12, LENGTH - 12
  x = random_embeds(3)
  x[1, pad:] = x[0, :valid]
  key_mask = jnp.asarray(np.arange(LENGTH)[None] >= np.array([[0], [pad]]))  # [B, L]
  positions = jnp.maximum(jnp.cumsum(key_mask, axis=1, dtype=jnp.int32) - 1, 0)  # [B, L]
  padded = run(model, x, positions, key_mask)
  other_padding = x.copy()
  other_padding[1, :pad] = 100.0 * random_embeds(4)[1, :pad]
  repadded = run(model, other_padding, positions, key_mask)
  alone = run(model, x[:1, :valid])
  assert np.isfinite(padded).all()
  np.testing.assert_allclose(repadded[1, pad:], padded[1, pad:], atol=1e-5)
  np.testing.assert_allclose(padded[1, pad:], alone[0], atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_last_outputs_only_match_the_full_output(pythia, causal):
  """num_outputs=T computes the last block for the last T positions only: the same as slicing the output."""
  _, folder = pythia
  model = converted(folder, causal=causal)
  x = random_embeds(6)
  key_mask = jnp.asarray(
      np.arange(LENGTH)[None] >= np.array([[0], [5]])
  )  # [B, L], row 1 left-padded
  graphdef, state = nnx.split(model)
  with jax.default_matmul_precision("highest"):
    full = nnx.merge(graphdef, state)(jnp.asarray(x), key_mask=key_mask)
    last = jax.jit(
        lambda state, x: nnx.merge(graphdef, state)(x, key_mask=key_mask, num_outputs=15)
    )(state, x)
  assert last.shape == (BATCH, 15, 128)
  np.testing.assert_allclose(last, full[:, -15:], atol=1e-5)


def test_bfloat16_compute(pythia):
  _, folder = pythia
  model = converted(folder, causal=True)
  low = NeoXTransformer(**PYTHIA_14M, causal=True, dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
  nnx.update(low, nnx.state(model, nnx.Param))
  x = random_embeds(5)
  full, half = run(model, x), run(low, x)
  assert half.dtype == np.float32  # the final LayerNorm runs in float32
  assert np.abs(half - full).max() < 0.1 * np.abs(full).max()


def test_config_mismatch_names_fields(pythia, tmp_path):
  _, folder = pythia
  for f in folder.iterdir():
    shutil.copy(f, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 256}))
  model = NeoXTransformer(**PYTHIA_14M, causal=True, rngs=nnx.Rngs(0))
  before = np.asarray(model.final_norm.scale[...])
  with pytest.raises(ConversionError, match=r"hidden_size: config has 256, model has d_model=128"):
    load_pythia(model, tmp_path)
  np.testing.assert_array_equal(model.final_norm.scale[...], before)


def test_config_check_reads_pythia_style_fields():
  """Real Pythia config.json files keep rotary_pct/rotary_emb_base at the top level (transformers < 5)."""
  pythia_70m = dict(
      hidden_size=512,
      num_hidden_layers=6,
      num_attention_heads=8,
      intermediate_size=2048,
      rotary_pct=0.25,
      rotary_emb_base=10000,
      layer_norm_eps=1e-5,
      use_parallel_residual=True,
      hidden_act="gelu",
      rope_scaling=None,
  )
  check_neox_config(pythia_70m, PYTHIA_70M)
  with pytest.raises(ConversionError) as error:
    check_neox_config({**pythia_70m, "rotary_pct": 0.5, "hidden_act": "gelu_new"}, PYTHIA_70M)
  assert "rotary_pct: config has 0.5, model has rotary_pct=0.25" in str(error.value)
  assert "hidden_act: config has 'gelu_new'" in str(error.value)


def test_wrong_shape_names_parameter_and_shapes(pythia):
  _, folder = pythia
  tensors = read_tensors(folder)
  tensors["gpt_neox.layers.2.mlp.dense_h_to_4h.weight"] = np.zeros((500, 128), np.float32)
  model = NeoXTransformer(**PYTHIA_14M, causal=True, rngs=nnx.Rngs(0))
  with pytest.raises(
      ConversionError,
      match=r"layers/2/mlp_in/kernel: checkpoint shape \(128, 500\) "
      r"!= model shape \(128, 512\)",
  ):
    load_pythia(model, tensors)


def test_report_lists_ignored_keys(pythia):
  _, folder = pythia
  old_buffers = {
      "gpt_neox.layers.0.attention.bias": np.ones((1, 1, 64, 64), bool),
      "gpt_neox.layers.0.attention.masked_bias": np.array(-1e9, np.float32),
      "gpt_neox.layers.0.attention.rotary_emb.inv_freq": np.ones(4, np.float32),
  }
  model = NeoXTransformer(**PYTHIA_14M, causal=True, rngs=nnx.Rngs(0))
  report = load_pythia(model, {**read_tensors(folder), **old_buffers})
  print(report)
  assert set(report.ignored) == {"gpt_neox.embed_in.weight", "embed_out.weight", *old_buffers}
  assert report.converted == len(param_dict(model))
  with pytest.raises(
      ConversionError, match=r"checkpoint tensor gpt_neox.layers.0.extra is not used"
  ):
    load_pythia(model, {**read_tensors(folder), "gpt_neox.layers.0.extra": np.zeros(3)})


def test_read_embed_in(pythia):
  reference, folder = pythia
  np.testing.assert_array_equal(read_embed_in(folder), reference.embed_in.weight.detach().numpy())


def test_pythia_70m_parameter_count():
  ours = nnx.eval_shape(lambda: NeoXTransformer(**PYTHIA_70M, causal=True, rngs=nnx.Rngs(0)))
  count = sum(int(np.prod(v.shape)) for v in param_dict(ours).values())
  reference = GPTNeoXModel(
      hf_config(
          hidden_size=512,
          num_attention_heads=8,
          intermediate_size=2048,
          vocab_size=50304,
          max_position_embeddings=2048,
      )
  )
  expected = sum(p.numel() for p in reference.parameters()) - reference.embed_in.weight.numel()
  print(f"Pythia-70M transformer without embedding: {count:,} parameters")
  assert count == expected == 18_915_328
