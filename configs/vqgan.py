"""Stage 1 of the recipe: the VQ-GAN alone, trained as an autoencoder (reconstruction + perceptual +
codebook losses), for data the paper's pretrained VQ-GAN (aMUSEd) does not cover, such as the built-in set.

  python train.py --config configs/vqgan.py:tiny --workdir runs/vqgan_tiny
  python eval.py --workdir runs/vqgan_tiny         # its PSNR: the ceiling DOVE is measured against
  python train.py --config configs/dove.py:tiny --workdir runs/tiny --config.init.vqgan=runs/vqgan_tiny

The same model section as configs/dove.py (so a stage-2 DOVE loads this VQ-GAN as it is); the transformers
are not trained and not saved into the VQ-GAN weights (`python -m dove_jax.export --part vqgan`).
"""

import ml_collections

from configs import dove


def get_config(preset: str = "") -> ml_collections.ConfigDict:
  config = dove.get_config(preset)
  with config.unlocked():
    config.train.objective = "vqgan"
    config.init.vqgan = ""  # stage 1 starts from random weights
    config.init.from_scratch = True
    config.optim.freeze = ("generator", "token_decoder", "query_embed")
    config.optim.eos_head_learning_rate = 0.0
    config.optim.learning_rate = 1e-3
    config.optim.warmup_steps = 100
    config.optim.final_learning_rate = 0.1  # of the peak: cosine decay ends here, not at zero
    # The tiny preset keeps configs/dove.py:tiny's data, MSE-only loss (LPIPS would double the step at 64 px
    # for little PSNR), batch of 16, 2,500 steps and logging.
  config.lock()
  return config
