"""The InceptionV3 of pytorch-fid, which every published FID uses, as a Flax NNX module (NHWC), and its
loader for pytorch-fid's weights file `pt_inception-2015-12-05-6726825d.pth`.

This is not torchvision's InceptionV3 but pytorch-fid's port of the TensorFlow FID graph: its average pools
ignore padding (`count_include_pad=False`) and the last block max-pools its pool branch (FIDInceptionA, C,
E_1, E_2). The output is the 2048-d pool3 feature after global average pooling.

Nothing is downloaded: give `load_inception` the local path of the weights file. The module names follow
torchvision's, so parameter paths read as the checkpoint keys ('Mixed_5b/branch1x1' <-> 'Mixed_5b.branch1x1').

Each conv's BatchNorm (inference mode, eps 1e-3) is folded into the conv's kernel and bias when the weights
are loaded: the network is only ever evaluated, so separate running statistics would be variables nothing
updates, one more op per layer, and a second path around `fill_params`, which fills nnx.Param only. Every
checkpoint tensor is still taken by name, and a missing or misshapen one is reported per parameter.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dove_jax import xla
from dove_jax.tensor_io import ConversionError, Source, conv_kernel, fill_params, join, read_tensors

INPUT_SIZE = 299
FEATURE_DIM = 2048
_BN_EPS = 1e-3
_IGNORABLE = {
    "fc.*": "the 1008-way ImageNet classifier; FID uses the pool3 features that feed it",
    "*.num_batches_tracked": "BatchNorm's training step counter; inference uses the running stats",
}

Values = dict[str, np.ndarray | None]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
  return (value, value) if isinstance(value, int) else value


class BasicConv2d(nnx.Module):
  """torchvision's BasicConv2d (conv without bias, BatchNorm, ReLU), its BatchNorm folded into the conv."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      kernel_size: int | tuple[int, int],
      *,
      stride: int = 1,
      padding: int | tuple[int, int] = 0,
      rngs: nnx.Rngs,
  ):
    pad_h, pad_w = _pair(padding)
    # Full float32 convs: TF32 or bf16 passes would move the features, and FID with them. Zero kernels: the
    # weights always come from the checkpoint, and random initialisers would compile once per kernel shape.
    self.conv = nnx.Conv(
        in_channels,
        out_channels,
        _pair(kernel_size),
        stride,
        padding=((pad_h, pad_h), (pad_w, pad_w)),
        precision=jax.lax.Precision.HIGHEST,
        kernel_init=nnx.initializers.zeros_init(),
        rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return nnx.relu(self.conv(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  """pytorch-fid's avg_pool2d(3, stride=1, padding=1, count_include_pad=False): padding is not averaged."""
  return nnx.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int) -> jax.Array:
  """Stride 2: torch's max_pool2d(3, stride=2) without padding. Stride 1: padding 1 (with -inf), size kept."""
  padding = "VALID" if stride == 2 else ((1, 1), (1, 1))
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nnx.Module):
  """pytorch-fid's FIDInceptionA (35x35): 1x1, 5x5, double 3x3 and avg-pool branches."""

  def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
    self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
    self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

  def __call__(
      self, x: jax.Array
  ) -> jax.Array:  # [B, 35, 35, Cin] -> [B, 35, 35, 224 + pool_features]
    branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    branch_pool = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nnx.Module):
  """torchvision's InceptionB (Mixed_6a): 35x35 -> 17x17 by strided 3x3, strided double 3x3 and max-pool."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2, rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, 35, 35, Cin] -> [B, 17, 17, 480 + Cin]
    branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([self.branch3x3(x), branch3x3dbl, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nnx.Module):
  """pytorch-fid's FIDInceptionC (17x17): 1x1, factorised 7x7, double factorised 7x7 and avg-pool branches."""

  def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
    c7 = channels_7x7
    self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, 17, 17, Cin] -> [B, 17, 17, 768]
    branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    branch7x7dbl = x
    for layer in (
        self.branch7x7dbl_1,
        self.branch7x7dbl_2,
        self.branch7x7dbl_3,
        self.branch7x7dbl_4,
        self.branch7x7dbl_5,
    ):
      branch7x7dbl = layer(branch7x7dbl)
    branch_pool = self.branch_pool(_avg_pool_3x3(x))
    return jnp.concatenate([self.branch1x1(x), branch7x7, branch7x7dbl, branch_pool], axis=-1)


class InceptionD(nnx.Module):
  """torchvision's InceptionD (Mixed_7a): 17x17 -> 8x8 by strided 3x3, 7x7 then strided 3x3, and max-pool."""

  def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
    self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2, rngs=rngs)
    self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
    self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3), rngs=rngs)
    self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0), rngs=rngs)
    self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, 17, 17, Cin] -> [B, 8, 8, 512 + Cin]
    branch3x3 = self.branch3x3_2(self.branch3x3_1(x))
    branch7x7x3 = x
    for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      branch7x7x3 = layer(branch7x7x3)
    return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nnx.Module):
  """pytorch-fid's FIDInceptionE_1 (`max_pool=False`: avg-pool branch ignoring padding) and FIDInceptionE_2
  (`max_pool=True`: the TF graph's max-pool branch) at 8x8: 1x1, split 3x3, double split 3x3 and pool.
  """

  def __init__(self, in_channels: int, *, max_pool: bool, rngs: nnx.Rngs):
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
    self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
    self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1), rngs=rngs)
    self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0), rngs=rngs)
    self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, 8, 8, Cin] -> [B, 8, 8, 2048]
    branch3x3 = self.branch3x3_1(x)
    branch3x3 = jnp.concatenate(
        [self.branch3x3_2a(branch3x3), self.branch3x3_2b(branch3x3)], axis=-1
    )
    branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    branch3x3dbl = jnp.concatenate(
        [self.branch3x3dbl_3a(branch3x3dbl), self.branch3x3dbl_3b(branch3x3dbl)], axis=-1
    )
    pooled = _max_pool_3x3(x, 1) if self.max_pool else _avg_pool_3x3(x)
    return jnp.concatenate(
        [self.branch1x1(x), branch3x3, branch3x3dbl, self.branch_pool(pooled)], axis=-1
    )


class InceptionV3(nnx.Module):
  """pytorch-fid's FID InceptionV3 up to pool3: [B, H, W, 3] images in [-1, 1], any size -> [B, 2048].

  Images are resized to 299x299 as pytorch-fid does (bilinear, half-pixel centres, no antialiasing: torch's
  F.interpolate(align_corners=False)). pytorch-fid then maps its [0, 1] input to [-1, 1]; ours already is in
  [-1, 1], and resizing commutes with that affine map, so resizing is all that is done.
  All parameters start at zero: the network is only meaningful with pytorch-fid's weights (`load_inception`).
  """

  def __init__(self):
    rngs = nnx.Rngs(0)  # nnx.Conv wants one; its zero initialisers never draw from it
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, rngs=rngs)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
    self.Mixed_5b = InceptionA(192, pool_features=32, rngs=rngs)
    self.Mixed_5c = InceptionA(256, pool_features=64, rngs=rngs)
    self.Mixed_5d = InceptionA(288, pool_features=64, rngs=rngs)
    self.Mixed_6a = InceptionB(288, rngs=rngs)
    self.Mixed_6b = InceptionC(768, channels_7x7=128, rngs=rngs)
    self.Mixed_6c = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6d = InceptionC(768, channels_7x7=160, rngs=rngs)
    self.Mixed_6e = InceptionC(768, channels_7x7=192, rngs=rngs)
    self.Mixed_7a = InceptionD(768, rngs=rngs)
    self.Mixed_7b = InceptionE(1280, max_pool=False, rngs=rngs)
    self.Mixed_7c = InceptionE(2048, max_pool=True, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:  # [B, H, W, 3] -> [B, 2048]
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"Inception takes [B, H, W, 3] images in [-1, 1]; got shape {images.shape}.")
    x = jax.image.resize(
        images.astype(jnp.float32),
        (len(images), INPUT_SIZE, INPUT_SIZE, 3),
        "bilinear",
        antialias=False,
    )  # [B, 299, 299, 3]
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # [B, 147, 147, 64]
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(_max_pool_3x3(x, 2)))  # [B, 71, 71, 192]
    x = _max_pool_3x3(x, 2)  # [B, 35, 35, 192]
    for block in (
        self.Mixed_5b,
        self.Mixed_5c,
        self.Mixed_5d,
        self.Mixed_6a,
        self.Mixed_6b,
        self.Mixed_6c,
        self.Mixed_6d,
        self.Mixed_6e,
        self.Mixed_7a,
        self.Mixed_7b,
        self.Mixed_7c,
    ):
      x = block(x)  # ... -> [B, 8, 8, 2048]
    return x.mean(axis=(1, 2))


def inception_features(model: InceptionV3, images: jax.Array) -> jax.Array:
  """[B, H, W, 3] images in [-1, 1] -> [B, 2048] pool3 features, compiled once per image shape."""
  return _apply(*nnx.split(model), images)


@xla.jit(static_argnums=0)  # the library's XLA options, as for DOVE's own convolution stacks
def _apply(graphdef: nnx.GraphDef, state: nnx.State, images: jax.Array) -> jax.Array:
  return nnx.merge(graphdef, state)(images)


def _folded_conv(source: Source, ours: str, theirs: str) -> Values:
  """A BasicConv2d's conv weight and BatchNorm -> our conv's kernel and bias, in float64 before the cast:
  BN(W * x) = (W s) * x + (beta - mean s), with s = gamma / sqrt(var + eps)."""
  weight = source.take(f"{theirs}.conv.weight")  # [O, I, kh, kw]
  gamma, beta, mean, var = (
      source.take(f"{theirs}.bn.{name}")
      for name in ("weight", "bias", "running_mean", "running_var")
  )  # [O] each
  names = (join(ours, "conv", "kernel"), join(ours, "conv", "bias"))
  if any(t is None for t in (weight, gamma, beta, mean, var)):
    return dict.fromkeys(names)  # fill_params reports the missing keys
  if any(t.shape != weight.shape[:1] for t in (gamma, beta, mean, var)):
    raise ConversionError(
        f"{source.origin}: {theirs}.bn tensors of shapes {gamma.shape}, {beta.shape}, "
        f"{mean.shape}, {var.shape} do not fit {theirs}.conv.weight {weight.shape}"
    )
  scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + _BN_EPS)
  kernel = conv_kernel(weight.astype(np.float64) * scale[:, None, None, None])
  return dict(zip(names, (kernel, beta - mean * scale)))


def inception_values(source: Source, model: InceptionV3) -> Values:
  """Our parameter paths -> arrays from a pytorch-fid Inception state dict (None where it lacks one)."""
  values = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, BasicConv2d):
      values |= _folded_conv(source, join(*path), ".".join(map(str, path)))
  return values


def load_inception(path: str | Path) -> InceptionV3:
  """pytorch-fid's FID Inception from its local weights file `pt_inception-2015-12-05-6726825d.pth`.

  Raises FileNotFoundError for a missing file, ConversionError naming every missing, misshapen or unknown
  tensor for a file of another network.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(
        f"no FID Inception weights at {path}: give the local path of pytorch-fid's "
        "pt_inception-2015-12-05-6726825d.pth (nothing is downloaded)."
    )
  model = InceptionV3()
  source = Source(read_tensors(path), str(path))
  fill_params(model, inception_values(source, model), source, _IGNORABLE)
  return model
