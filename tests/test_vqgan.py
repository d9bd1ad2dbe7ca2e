"""VQGAN and quantizer: parity with diffusers' VQModel through our converter, conversion errors, VQ maths."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import VQModel
from flax import nnx
from safetensors.torch import save_file

from dove_jax.convert.diffusers_vq import load_diffusers_vqgan
from dove_jax.models import vqgan
from dove_jax.models.quantizer import VectorQuantizer
from dove_jax.models.vqgan import AMUSED_VQGAN, VQGAN
from dove_jax.tensor_io import ConversionError, param_dict

TINY = dict(
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=8,
    num_vq_embeddings=64,
    vq_embed_dim=8,
    norm_num_groups=8,
)
ATOL = 1e-4


@pytest.fixture(autouse=True)
def full_precision():
  """Parity needs true float32 matmuls/convs, which accelerators do not give by default."""
  with jax.default_matmul_precision("highest"):
    yield


def diffusers_vqmodel(
    *,
    block_out_channels,
    layers_per_block,
    latent_channels,
    num_vq_embeddings,
    vq_embed_dim,
    norm_num_groups,
    mid_block_attention,
) -> VQModel:
  """The diffusers VQModel of one of our configs, with random 1-D parameters (norms start at 1/0, which
  would hide a swapped scale and bias) and a codebook drawn near actual latents, so many codes get used.
  """
  torch.manual_seed(0)
  model = VQModel(
      in_channels=3,
      out_channels=3,
      down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
      up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
      block_out_channels=block_out_channels,
      layers_per_block=layers_per_block,
      act_fn="silu",
      latent_channels=latent_channels,
      num_vq_embeddings=num_vq_embeddings,
      norm_num_groups=norm_num_groups,
      vq_embed_dim=vq_embed_dim,
      norm_type="group",
      mid_block_add_attention=mid_block_attention,
  ).eval()
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim == 1:
        p.add_(0.2 * torch.randn_like(p))
    latents = model.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latents
    latents = latents.permute(0, 2, 3, 1).reshape(-1, vq_embed_dim)  # [N, C]
    picks = latents[torch.randint(len(latents), (num_vq_embeddings,))]  # [K, C]
    model.quantize.embedding.weight.copy_(picks + 0.1 * latents.std() * torch.randn_like(picks))
  return model


def nhwc(x: torch.Tensor) -> jax.Array:
  return jnp.asarray(x.numpy().transpose(0, 2, 3, 1))


def max_diff(ours: jax.Array, theirs: torch.Tensor) -> float:
  return float(np.abs(np.asarray(ours) - theirs.numpy().transpose(0, 2, 3, 1)).max())


def jitted(model: nnx.Module, method: str, **static):
  """model.method(*args, **static) under plain jax.jit, through nnx.split/merge."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args, **static))
  return lambda *args: fn(state, *args)


def check_parity(model: VQGAN, reference: VQModel, images: torch.Tensor) -> int:
  """encode / quantize / decode (with and without quantization) / forward of both models on the same images,
  ours under jax.jit; returns how many distinct codes the reference chose."""
  with torch.no_grad():
    latents = reference.encode(images).latents
    _, loss, (_, _, indices) = reference.quantize(latents)
    decoded = reference.decode(latents).sample
    decoded_raw = reference.decode(latents, force_not_quantize=True).sample
    reconstruction = reference(images).sample
  quantized = jitted(model, "quantize")(nhwc(latents))
  recon, forward_quantized = jitted(model, "__call__")(nhwc(images))
  diffs = dict(
      encode=max_diff(jitted(model, "encode")(nhwc(images)), latents),
      decode=max_diff(jitted(model, "decode")(nhwc(latents)), decoded),
      decode_unquantized=max_diff(
          jitted(model, "decode", quantize=False)(nhwc(latents)), decoded_raw
      ),
      forward=max_diff(recon, reconstruction),
  )
  print(f"max abs diffs: {diffs}")
  assert all(d <= ATOL for d in diffs.values()), diffs
  np.testing.assert_array_equal(
      np.asarray(quantized.indices).reshape(-1), indices.numpy().reshape(-1)
  )
  np.testing.assert_array_equal(
      np.asarray(forward_quantized.indices), np.asarray(quantized.indices)
  )
  np.testing.assert_allclose(float(quantized.loss), float(loss), rtol=1e-5)
  return len(np.unique(indices.numpy()))


@pytest.mark.parametrize("mid_block_attention", [False, True])
def test_tiny_parity(tmp_path, mid_block_attention):
  reference = diffusers_vqmodel(**TINY, mid_block_attention=mid_block_attention)
  # A diffusers model folder for one case, a bare .safetensors file for the other.
  if mid_block_attention:
    checkpoint = tmp_path / "vq.safetensors"
    save_file(reference.state_dict(), str(checkpoint))
  else:
    reference.save_pretrained(tmp_path)
    checkpoint = tmp_path
  model = VQGAN(**TINY, mid_block_attention=mid_block_attention, rngs=nnx.Rngs(0))
  report = load_diffusers_vqgan(model, checkpoint)
  assert report.converted == len(param_dict(model)) and not report.ignored
  codes_used = check_parity(model, reference, torch.rand(2, 3, 32, 32) * 2 - 1)
  assert codes_used > 8, "codebook too degenerate for a meaningful index check"


def test_legacy_attention_names_from_bin(tmp_path):
  """Checkpoints from older diffusers name the attention projections query/key/value/proj_attn."""
  reference = diffusers_vqmodel(**TINY, mid_block_attention=True)
  renames = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {}
  for key, value in reference.state_dict().items():
    for new, old in renames.items():
      key = key.replace(f".{new}.", f".{old}.")
    state[key] = value
  torch.save(state, tmp_path / "vq.bin")
  model = VQGAN(**TINY, mid_block_attention=True, rngs=nnx.Rngs(0))
  load_diffusers_vqgan(model, tmp_path / "vq.bin")
  with torch.no_grad():
    expected = reference.encoder.mid_block.attentions[0].to_q.weight.numpy()
  np.testing.assert_array_equal(
      np.asarray(model.encoder.mid_block.attention.to_q.kernel[...]), expected.T
  )


def test_amused_parity_and_size():
  """The paper's VQGAN at 32x32 (2x2 latents): parameter count and parity."""
  config = {k: v for k, v in AMUSED_VQGAN.items() if k != "mid_block_attention"}
  reference = diffusers_vqmodel(**config, mid_block_attention=AMUSED_VQGAN["mid_block_attention"])
  model = VQGAN(**AMUSED_VQGAN, rngs=nnx.Rngs(0))
  n_ours = sum(p.size for p in param_dict(model).values())
  n_theirs = sum(p.numel() for p in reference.parameters())
  print(f"aMUSEd VQGAN parameters: ours {n_ours:,}, diffusers {n_theirs:,}")
  assert n_ours == n_theirs and 140e6 < n_ours < 152e6
  load_diffusers_vqgan(model, {k: v.numpy() for k, v in reference.state_dict().items()})
  assert check_parity(model, reference, torch.rand(2, 3, 32, 32) * 2 - 1) > 1


def test_conversion_errors_name_every_problem():
  state = {
      k: v.numpy()
      for k, v in diffusers_vqmodel(**TINY, mid_block_attention=False).state_dict().items()
  }
  state["encoder.conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  state["encoder.extra.weight"] = np.zeros((3,), np.float32)
  del state["decoder.conv_out.bias"]
  model = VQGAN(**TINY, rngs=nnx.Rngs(0))
  before = np.asarray(model.quant_conv.kernel[...]).copy()
  with pytest.raises(ConversionError) as error:
    load_diffusers_vqgan(model, state)
  message = str(error.value)
  assert (
      "encoder/conv_in/kernel" in message
      and "(5, 5, 3, 32)" in message
      and "(3, 3, 3, 32)" in message
  )
  assert "encoder.extra.weight" in message
  assert "decoder.conv_out.bias" in message
  np.testing.assert_array_equal(np.asarray(model.quant_conv.kernel[...]), before)


def test_folder_config_mismatch(tmp_path):
  """A GroupNorm group count shapes cannot reveal is caught from config.json."""
  reference = diffusers_vqmodel(**TINY, mid_block_attention=False)
  reference.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  (tmp_path / "config.json").write_text(json.dumps(config | {"norm_num_groups": 4}))
  with pytest.raises(ConversionError, match="norm_num_groups=4"):
    load_diffusers_vqgan(VQGAN(**TINY, rngs=nnx.Rngs(0)), tmp_path)


def small_quantizer(num_embeddings=16, dim=8, seed=0) -> VectorQuantizer:
  quantizer = VectorQuantizer(num_embeddings, dim, rngs=nnx.Rngs(seed))
  quantizer.embedding[...] = jax.random.normal(jax.random.key(seed + 1), (num_embeddings, dim))
  return quantizer


def test_quantizer_matches_brute_force():
  quantizer = small_quantizer()
  z = jax.random.normal(jax.random.key(2), (2, 4, 5, 8))
  out = quantizer(z)
  codebook = np.asarray(quantizer.embedding[...])
  expected = np.argmin(((np.asarray(z)[..., None, :] - codebook) ** 2).sum(-1), axis=-1)
  assert out.indices.dtype == jnp.int32 and out.indices.shape == (2, 4, 5)
  np.testing.assert_array_equal(np.asarray(out.indices), expected)
  np.testing.assert_allclose(np.asarray(out.quantized), codebook[expected], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(quantizer.lookup(out.indices)), codebook[expected])


def test_quantizer_gradients_and_loss():
  """Straight-through estimator; legacy loss = commitment + beta * codebook, equal in value to
  (1 + beta) * mse, with the encoder-side gradient at full weight."""
  quantizer = small_quantizer()
  z = jax.random.normal(jax.random.key(3), (2, 3, 3, 8))
  np.testing.assert_array_equal(
      np.asarray(jax.grad(lambda z: quantizer(z).quantized.sum())(z)), 1.0
  )
  out = quantizer(z)
  z_q = np.asarray(quantizer.lookup(out.indices))
  mse = np.mean((z_q - np.asarray(z)) ** 2)
  np.testing.assert_allclose([out.commitment_loss, out.codebook_loss], [mse, mse], rtol=1e-6)
  np.testing.assert_allclose(out.loss, 1.25 * mse, rtol=1e-6)
  grad_z = jax.grad(lambda z: quantizer(z).loss)(z)
  np.testing.assert_allclose(
      np.asarray(grad_z), 2 * (np.asarray(z) - z_q) / z_q.size, rtol=1e-5, atol=1e-8
  )


def test_code_statistics_hand_made():
  quantizer = VectorQuantizer(4, 4, rngs=nnx.Rngs(0))
  quantizer.embedding[...] = jnp.eye(4)
  codes = jnp.eye(4)
  half = quantizer(codes[jnp.array([0, 0, 1, 1])].reshape(1, 2, 2, 4))
  np.testing.assert_allclose([half.code_usage, half.perplexity], [0.5, 2.0], rtol=1e-6)
  full = quantizer(codes[jnp.array([3, 1, 2, 0])].reshape(1, 2, 2, 4))
  np.testing.assert_array_equal(np.asarray(full.indices).reshape(-1), [3, 1, 2, 0])
  np.testing.assert_allclose([full.code_usage, full.perplexity], [1.0, 4.0], rtol=1e-6)
  single = quantizer(jnp.broadcast_to(codes[2], (1, 2, 2, 4)))
  np.testing.assert_allclose([single.code_usage, single.perplexity], [0.25, 1.0], rtol=1e-6)


def test_quantizer_under_jit():
  quantizer = small_quantizer()
  z = jax.random.normal(jax.random.key(4), (2, 4, 4, 8))
  eager, compiled = quantizer(z), jitted(quantizer, "__call__")(z)
  for name in ("quantized", "indices", "loss", "perplexity", "code_usage"):
    np.testing.assert_allclose(
        np.asarray(getattr(compiled, name)), np.asarray(getattr(eager, name)), rtol=1e-6
    )
