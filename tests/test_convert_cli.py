"""`python -m dove_jax.convert` end to end: PyTorch folders in, a DOVE weights file out, loaded and checked."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from flax import nnx
from transformers import GPTNeoXForCausalLM

from dove_jax import DOVE, load_weights
from test_neox import hf_config
from test_vqgan import diffusers_vqmodel, max_diff, nhwc

ROOT = Path(__file__).resolve().parents[1]


def tiny_config():
  sys.path.insert(0, str(ROOT))
  try:
    from configs import dove
  finally:
    sys.path.pop(0)
  return dove.get_config("tiny")


def test_convert_command_builds_a_loadable_dove(tmp_path):
  config = tiny_config()
  vq = diffusers_vqmodel(**config.model.vqgan)
  vq.save_pretrained(tmp_path / "vq")
  width = config.model.generator
  lm = GPTNeoXForCausalLM(
      hf_config(
          hidden_size=width.d_model,
          num_hidden_layers=width.num_layers,
          num_attention_heads=width.num_heads,
          intermediate_size=width.mlp_dim,
      )
  )
  lm.save_pretrained(tmp_path / "pythia")
  out = tmp_path / "dove.safetensors"

  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "dove_jax.convert",
          "--config",
          "configs/dove.py:tiny",
          f"--vqgan={tmp_path / 'vq'}",
          f"--pythia={tmp_path / 'pythia'}",
          f"--out={out}",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode == 0, result.stderr
  assert "ignored embed_out.weight: language-model head" in result.stdout
  assert result.stdout.count("parameters converted") == 3  # VQGAN, generator blocks, decoder blocks

  model = DOVE(**config.model, rngs=nnx.Rngs(1))
  load_weights(model, out)
  images = torch.rand(2, 3, 64, 64) * 2 - 1
  with torch.no_grad():
    expected = vq(images).sample
  reconstruction, _ = model.vqgan(nhwc(images))
  assert max_diff(reconstruction, expected) <= 1e-4
  qkv = lm.gpt_neox.layers[1].attention.query_key_value.weight.detach().numpy().T
  for transformer in (model.generator.transformer, model.token_decoder.transformer):
    np.testing.assert_array_equal(transformer.layers[1].qkv.kernel[...], qkv)


def test_convert_command_reports_a_mismatched_pythia(tmp_path):
  GPTNeoXForCausalLM(
      hf_config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256)
  ).save_pretrained(tmp_path / "pythia")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "dove_jax.convert",
          "--config",
          "configs/dove.py:tiny",
          f"--pythia={tmp_path / 'pythia'}",
          f"--out={tmp_path / 'dove.safetensors'}",
      ],
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert result.returncode != 0
  assert "hidden_size: config has 32, model has d_model=64" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "dove.safetensors").exists()
