"""dove-jax: DOVE, a vision encoder with a variable number of continuous tokens per image (JAX, Flax NNX).

  model = DOVE(rngs=nnx.Rngs(0))                  # the paper's model
  tokens = model.encode(images, token_budget=64)   # images: NHWC floats in [-1, 1]
  images = model.decode(tokens)
  save_pretrained(model, "my_dove"); model = DOVE.from_pretrained("my_dove")   # one folder per model

Importing the package loads neither TensorFlow nor PyTorch.
"""

from dove_jax.models.dove import DOVE, DOVEOutput, Tokens
from dove_jax.models.eos import apply_mask, eos_mask
from dove_jax.weights import load_weights, save_pretrained, save_weights

__all__ = [
    "DOVE",
    "DOVEOutput",
    "Tokens",
    "apply_mask",
    "eos_mask",
    "load_weights",
    "save_pretrained",
    "save_weights",
]
