"""DOVE: the paper's recipe, and a `tiny` preset that trains on a 2-core CPU in minutes.

  python train.py --config configs/dove.py --workdir runs/dove         the paper's recipe (ImageNet, 256 px)
  python train.py --config configs/dove.py:tiny --workdir runs/tiny    built-in data, 64 px, CPU
  --config.optim.learning_rate=3e-4                                    any field from the command line

The tiny preset is stage 2 of the built-in recipe: it starts from the stage-1 VQ-GAN shipped in weights/tiny
(trained by configs/vqgan.py:tiny), as the paper starts from a trained VQ-GAN; point init.vqgan at your own
stage-1 run to use that instead. The config is locked: a mistyped field fails before any compute, naming the
field.
"""

from pathlib import Path

import ml_collections

SHIPPED = Path(__file__).resolve().parent.parent / "weights"  # small trained weights, committed


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # The model; these are the keyword arguments of dove_jax.DOVE.
  config.model = ml_collections.ConfigDict()
  config.model.image_size = 256
  # The aMUSEd / open-MUSE VQ-GAN (diffusers VQModel layout): x16 downsampling, 8192 codes of width 64.
  config.model.vqgan = dict(
      block_out_channels=(128, 256, 256, 512, 768),
      layers_per_block=2,
      latent_channels=64,
      num_vq_embeddings=8192,
      vq_embed_dim=64,
      norm_num_groups=32,
      mid_block_attention=False,
  )
  # Both transformers are Pythia-70M-shaped (GPT-NeoX); the generator is causal, the decoder bidirectional.
  config.model.generator = dict(num_layers=6, d_model=512, num_heads=8, mlp_dim=2048)
  config.model.decoder = dict(num_layers=6, d_model=512, num_heads=8, mlp_dim=2048)
  config.model.max_tokens = 256
  config.model.eos_threshold = 0.5
  # Not stated by the paper, so configurable:
  config.model.quantize_features = False  # feed the generator the quantized H_v
  config.model.requantize_output = (
      False  # snap decoded latents to the codebook before the VQGAN decoder
  )
  config.model.eos_bias_init = -4.0  # start at full length
  config.model.token_dim = (
      0  # > 0: tokens projected to this width; 0 = the generator's width (the paper)
  )
  config.model.dtype = ""  # compute dtype of convolutions and matmuls: "" (float32) or "bfloat16"
  # What the backward pass keeps of each VQ-GAN resnet block and transformer block (memory for compute):
  # "none", "save_matmuls" (recompute norms and activations) or "blocks" (recompute whole blocks).
  config.model.remat = "none"
  # How convolutions, norms and attention are computed (dove_jax/models/kernels.py): "auto" = kernels shaped
  # for XLA's CPU on a CPU, plain XLA (cuDNN attention in bf16) on a GPU; "cpu", "xla" or "cudnn" force one.
  config.model.kernels = "auto"

  # Pretrained weights, read from local paths (nothing is downloaded).
  config.init = ml_collections.ConfigDict()
  config.init.vqgan = ""  # a diffusers VQModel folder or .safetensors/.bin file
  config.init.pythia = ""  # a Hugging Face GPT-NeoX folder (Pythia-70M for the paper model)
  config.init.weights = ""  # or a whole-model .safetensors from `python -m dove_jax.convert`
  config.init.checkpoint = ""  # or a training run's workdir: its latest parameters (applied last)
  config.init.from_scratch = (
      False  # True: none of the above on purpose (training refuses to start otherwise)
  )

  # Input. source: "builtin" (generated locally), "tfds" (a data set prepared under data_dir) or "folder".
  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"
  config.data.name = "imagenet2012"  # the TFDS name, for source="tfds"
  config.data.data_dir = "~/tensorflow_datasets"
  config.data.folder = ""  # an image folder, for source="folder"
  # The share of a folder's images held out for evaluation, chosen by a hash of each relative path
  # (dove_jax.data.sources.held_out); 1 = a folder that is only evaluated.
  config.data.eval_fraction = 0.05
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.data.global_batch_size = 64
  config.data.worker_count = 8
  config.data.prefetch = 2  # batches transferred to the devices ahead of the train step (0 = none)

  # Losses (DOVE.md): L_total = rec_weight * L_rec + lambda_eos(step) * L_eos, per image.
  config.loss = ml_collections.ConfigDict()
  config.loss.rec_weight = 1.0
  config.loss.mse_weight = 1.0
  config.loss.lpips_weight = 0.1
  config.loss.gan_weight = 5e-10  # tiny on purpose: avoids hallucinated detail
  config.loss.gan_kind = "hinge"  # or "non_saturating"
  config.loss.gan_start_step = 0
  config.loss.vq_weight = 1.0  # the quantizer's loss, when quantize_features is set
  config.loss.threshold_window = (
      100  # the EOS threshold: mean L_rec of the own-length images, this many last steps
  )
  config.loss.eos_weight_start = 1e-6  # lambda_eos grows from this ...
  config.loss.eos_weight_end = 1e-2  # ... to this ...
  config.loss.eos_weight_steps = 20_000  # ... over this many steps ...
  config.loss.eos_weight_kind = "exponential"  # ... along this curve ("linear", "constant")
  # A fraction of the images are reconstructed at a random forced length, so every budget works.
  config.loss.random_length_fraction = 0.5
  # Their lengths: P(length <= k) = (k / n) ** power; 1 = uniform, 2 = likelier the longer.
  config.loss.random_length_power = 1.0

  config.discriminator = ml_collections.ConfigDict()
  config.discriminator.base_channels = 64
  config.discriminator.num_layers = 3

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 1e-4
  config.optim.disc_learning_rate = 1e-4
  config.optim.warmup_steps = 2_000
  config.optim.final_learning_rate = (
      0.0  # where the cosine decay ends, as a fraction of learning_rate
  )
  config.optim.weight_decay = 0.01
  config.optim.b1 = 0.9
  config.optim.b2 = 0.99
  config.optim.grad_clip = 1.0
  config.optim.freeze = ()  # parameter path prefixes left untouched, e.g. ("vqgan",)
  # Only L_eos reaches the EOS head; with SGD (not Adam) its steps scale with lambda_eos. 0 = AdamW like the rest.
  config.optim.eos_head_learning_rate = 1.0

  config.train = ml_collections.ConfigDict()
  config.train.objective = "dove"  # or "vqgan": stage 1, the VQ-GAN alone (configs/vqgan.py)
  config.train.num_epochs = 20  # the paper: 20 epochs of ImageNet-1K
  config.train.num_steps = 0  # > 0 overrides num_epochs
  config.train.log_every = 100
  config.train.image_every = 2_000  # input vs reconstruction at a few budgets
  config.train.eval_every = 5_000
  config.train.eval_batches = 20
  config.train.checkpoint_every = 1_000
  config.train.keep_checkpoints = 3
  # Compiled programs are kept in workdir/compilation_cache: a resumed run loads its steps, not compiles them.
  config.train.compilation_cache = True

  # Devices: a mesh with a data axis and an fsdp axis (parameters sharded over it); -1 = all the rest.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1

  if preset == "tiny":
    config.model.image_size = 64
    # Narrow at full resolution: XLA's CPU convolutions are slow on few channels at 64 x 64.
    config.model.vqgan = dict(
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=16,
        num_vq_embeddings=512,
        vq_embed_dim=16,
        norm_num_groups=8,
        mid_block_attention=False,
    )
    config.model.generator = dict(num_layers=2, d_model=64, num_heads=4, mlp_dim=256)
    config.model.decoder = dict(num_layers=2, d_model=64, num_heads=4, mlp_dim=256)
    config.model.max_tokens = 64
    # 16 floats a token (64 tokens: a quarter of the 16 x 16 x 16 latent grid): with the generator's 64,
    # the first few tokens held all a short run learns and later ones added nothing (docs/fidelity.md).
    config.model.token_dim = 16
    # Stage 2: from the shipped stage-1 VQ-GAN, frozen (its encoder runs forward only); the transformers
    # start from random weights, as no Pythia of this size exists.
    config.init.vqgan = str(SHIPPED / "tiny" / "vqgan.safetensors")
    config.optim.freeze = ("vqgan",)
    config.data.source = "builtin"
    config.data.name = "dove_shapes"
    config.data.data_dir = "data"
    config.data.global_batch_size = 16
    config.data.worker_count = 0
    # lambda_eos stays below 1e-3 for the first 1200 steps: the lengths may not shrink before the tokens
    # make a difference to the reconstruction, or the model learns to need few. Near 0.1 the predicted
    # lengths fall to a few tokens and then climb back with the quality (a mean of 7.5 at step 2,500).
    config.loss.eos_weight_steps = 2000
    config.loss.eos_weight_end = 1e-1
    # MSE alone on the CPU: LPIPS (VGG16) would be half of every step, and the GAN term is 5e-10 of L_rec.
    config.loss.lpips_weight = 0.0
    config.loss.gan_weight = 0.0
    config.discriminator.base_channels = 16
    config.discriminator.num_layers = 2
    # Forced lengths drawn likelier the longer, so the last slots are trained too; with 3e-3 (1e-3 and 3e-4
    # leave the mean-colour plateau later) 64 tokens beat 16 by 2 dB after 2,500 steps (docs/fidelity.md).
    config.loss.random_length_power = 2.0
    config.optim.learning_rate = 3e-3
    config.optim.final_learning_rate = 0.1
    config.optim.disc_learning_rate = 1e-4
    config.optim.warmup_steps = 50
    config.train.num_steps = 2500
    config.train.log_every = 50
    config.train.image_every = 500
    config.train.eval_every = 500
    config.train.eval_batches = 4
    config.train.checkpoint_every = 500
  elif preset:
    raise ValueError(f"unknown preset {preset!r} for configs/dove.py; presets: '' (paper), 'tiny'")
  config.lock()
  return config
