"""DOVE: the paper's model, and a `tiny` preset for CPUs and tests.

  python -m dove_jax.convert --config configs/dove.py --vqgan VQ_DIR --pythia PYTHIA_DIR --out dove.safetensors
  --config configs/dove.py:tiny            the small model
  --config.model.max_tokens=128            any field from the command line
"""
import ml_collections


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The model; these are the keyword arguments of dove_jax.DOVE.
  config.model = ml_collections.ConfigDict()
  config.model.image_size = 256
  # The aMUSEd / open-MUSE VQ-GAN (diffusers VQModel layout): x16 downsampling, 8192 codes of width 64.
  config.model.vqgan = dict(block_out_channels=(128, 256, 256, 512, 768), layers_per_block=2,
                            latent_channels=64, num_vq_embeddings=8192, vq_embed_dim=64,
                            norm_num_groups=32, mid_block_attention=False)
  # Both transformers are Pythia-70M-shaped (GPT-NeoX); the generator is causal, the decoder bidirectional.
  config.model.generator = dict(num_layers=6, d_model=512, num_heads=8, mlp_dim=2048)
  config.model.decoder = dict(num_layers=6, d_model=512, num_heads=8, mlp_dim=2048)
  config.model.max_tokens = 256
  config.model.eos_threshold = 0.5
  # Not stated by the paper, so configurable:
  config.model.quantize_features = False  # feed the generator the quantized H_v
  config.model.requantize_output = False  # snap decoded latents to the codebook before the VQGAN decoder
  config.model.eos_bias_init = -4.0  # start at full length
  config.model.dtype = ""  # compute dtype of the transformers: "" (float32) or "bfloat16"

  # Pretrained weights, read from local paths (nothing is downloaded).
  config.init = ml_collections.ConfigDict()
  config.init.vqgan = ""  # a diffusers VQModel folder or .safetensors/.bin file
  config.init.pythia = ""  # a Hugging Face GPT-NeoX folder (Pythia-70M for the paper model)

  if preset == "tiny":
    config.model.image_size = 64
    config.model.vqgan = dict(block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=16,
                              num_vq_embeddings=512, vq_embed_dim=16, norm_num_groups=16,
                              mid_block_attention=False)
    config.model.generator = dict(num_layers=2, d_model=64, num_heads=4, mlp_dim=256)
    config.model.decoder = dict(num_layers=2, d_model=64, num_heads=4, mlp_dim=256)
    config.model.max_tokens = 64
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/dove.py; presets: '' (paper), 'tiny'")
  return config
