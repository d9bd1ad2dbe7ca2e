"""VQGAN in the layout of diffusers' `VQModel`, so that its checkpoints (aMUSEd / open-MUSE) convert 1:1.

Images are NHWC float32 in [-1, 1]. Only diffusers' norm_type="group" is supported (GroupNorm, eps 1e-6,
SiLU everywhere); the "spatial" norm of MoVQ-style decoders is not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dove_jax.models import kernels, remat as remat_lib
from dove_jax.models.norms import GroupNorm
from dove_jax.models.quantizer import QuantizerOutput, VectorQuantizer

# The aMUSEd / open-MUSE VQ-GAN (about 146M parameters): 16x downsampling, 8192 codes of width 64.
AMUSED_VQGAN = dict(
    block_out_channels=(128, 256, 256, 512, 768),
    layers_per_block=2,
    latent_channels=64,
    num_vq_embeddings=8192,
    vq_embed_dim=64,
    norm_num_groups=32,
    mid_block_attention=False,
)


def group_norm(channels: int, *, num_groups: int, rngs: nnx.Rngs) -> GroupNorm:
  """diffusers' GroupNorm. Two-pass variance, as torch computes it: the one-pass E[x^2]-E[x]^2 loses
  digits on activations with large means and breaks 1e-4 parity with converted checkpoints."""
  return GroupNorm(
      channels, num_groups=num_groups, epsilon=1e-6, use_fast_variance=False, rngs=rngs
  )


class Conv(kernels.UsesKernels, nnx.Conv):
  """nnx.Conv (same parameters) for stride-1 convolutions with explicit padding, by `kernels.conv2d`."""

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Ci] -> [B, H', W', Co]
    x, kernel, bias = self.promote_dtype((x, self.kernel[...], self.bias[...]), dtype=self.dtype)
    padding = ((0, 0), (0, 0)) if self.padding == "VALID" else self.padding
    return kernels.conv2d(x, kernel, padding, self.kernels) + bias


def conv3x3(in_channels: int, out_channels: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Conv:
  return Conv(in_channels, out_channels, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)


def conv1x1(in_channels: int, out_channels: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Conv:
  return Conv(in_channels, out_channels, (1, 1), padding="VALID", dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
  """diffusers `ResnetBlock2D` without time embedding: x + conv(act(norm(conv(act(norm(x))))))."""

  def __init__(
      self, in_channels: int, out_channels: int, *, norm_num_groups: int, dtype=None, rngs: nnx.Rngs
  ):
    self.norm1 = group_norm(in_channels, num_groups=norm_num_groups, rngs=rngs)
    self.conv1 = conv3x3(in_channels, out_channels, dtype=dtype, rngs=rngs)
    self.norm2 = group_norm(out_channels, num_groups=norm_num_groups, rngs=rngs)
    self.conv2 = conv3x3(out_channels, out_channels, dtype=dtype, rngs=rngs)
    # A 1x1 projection of the skip path only where the width changes.
    self.conv_shortcut = (
        conv1x1(in_channels, out_channels, dtype=dtype, rngs=rngs)
        if in_channels != out_channels
        else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H, W, Cout]
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    return skip + h


def _run_resnet(block: ResnetBlock, x: jax.Array) -> jax.Array:
  return block(x)


class Attention(nnx.Module):
  """diffusers' mid-block `Attention`: group norm, one head as wide as the channels, residual."""

  def __init__(self, channels: int, *, norm_num_groups: int, dtype=None, rngs: nnx.Rngs):
    self.group_norm = group_norm(channels, num_groups=norm_num_groups, rngs=rngs)
    self.to_q, self.to_k, self.to_v, self.to_out = (
        nnx.Linear(channels, channels, dtype=dtype, rngs=rngs) for _ in range(4)
    )

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
    b, h, w, c = x.shape
    tokens = self.group_norm(x).reshape(b, h * w, c)  # [B, N, C]
    q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
    logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32)  # [B, N, N]
    weights = jax.nn.softmax(logits / jnp.sqrt(c), axis=-1).astype(v.dtype)  # float32 softmax
    out = self.to_out(jnp.einsum("bqk,bkc->bqc", weights, v))  # [B, N, C]
    return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """diffusers `UNetMidBlock2D` with one layer: resnet, optional attention, resnet."""

  def __init__(
      self,
      channels: int,
      *,
      norm_num_groups: int,
      attention: bool,
      remat: str = "none",
      dtype=None,
      rngs: nnx.Rngs,
  ):
    self.remat = remat_lib.check(remat)
    self.resnets = nnx.List(
        [
            ResnetBlock(channels, channels, norm_num_groups=norm_num_groups, dtype=dtype, rngs=rngs)
            for _ in range(2)
        ]
    )
    self.attention = (
        Attention(channels, norm_num_groups=norm_num_groups, dtype=dtype, rngs=rngs)
        if attention
        else None
    )

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C]
    run = remat_lib.checkpointed(_run_resnet, self.remat)
    x = run(self.resnets[0], x)
    if self.attention is not None:
      x = self.attention(x)
    return run(self.resnets[1], x)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after zero-padding only bottom and right, as diffusers' Downsample2D(padding=0)."""

  def __init__(self, channels: int, *, dtype=None, rngs: nnx.Rngs):
    self.conv = nnx.Conv(
        channels, channels, (3, 3), strides=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, H/2, W/2, C]
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest-neighbour x2 upsampling, then a 3x3 conv (diffusers' Upsample2D with use_conv=True), by
  `kernels.upsample_conv3x3` (on the CPU without building the upsampled image)."""

  def __init__(self, channels: int, *, dtype=None, rngs: nnx.Rngs):
    self.conv = conv3x3(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, 2H, 2W, C]
    conv = self.conv
    x, kernel, bias = conv.promote_dtype((x, conv.kernel[...], conv.bias[...]), dtype=conv.dtype)
    return kernels.upsample_conv3x3(x, kernel, bias, conv.kernels)


class Stage(nnx.Module):
  """A run of resnet blocks at one resolution, then an optional resampling: diffusers'
  `DownEncoderBlock2D` (resample="down") and `UpDecoderBlock2D` (resample="up")."""

  def __init__(
      self,
      in_channels: int,
      out_channels: int,
      *,
      num_layers: int,
      resample: str | None,
      norm_num_groups: int,
      remat: str = "none",
      dtype=None,
      rngs: nnx.Rngs,
  ):
    self.remat = remat_lib.check(remat)
    self.resnets = nnx.List(
        [
            ResnetBlock(
                in_channels if i == 0 else out_channels,
                out_channels,
                norm_num_groups=norm_num_groups,
                dtype=dtype,
                rngs=rngs,
            )
            for i in range(num_layers)
        ]
    )
    resampler = {"down": Downsample, "up": Upsample}.get(resample)
    self.resample = None if resampler is None else resampler(out_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # [B, H, W, Cin] -> [B, H', W', Cout]
    run = remat_lib.checkpointed(_run_resnet, self.remat)
    for resnet in self.resnets:
      x = run(resnet, x)
    return x if self.resample is None else self.resample(x)


def stages(
    widths: tuple[int, ...],
    *,
    num_layers: int,
    resample: str,
    norm_num_groups: int,
    remat: str,
    dtype,
    rngs: nnx.Rngs,
) -> nnx.List:
  """One Stage per width, as diffusers builds them: stage i maps widths[i-1] (widths[0] for the first) to
  widths[i], and every stage but the last resamples."""
  widths = tuple(widths)
  pairs = list(zip((widths[0],) + widths[:-1], widths))
  return nnx.List(
      [
          Stage(
              cin,
              cout,
              num_layers=num_layers,
              resample=None if i == len(pairs) - 1 else resample,
              norm_num_groups=norm_num_groups,
              remat=remat,
              dtype=dtype,
              rngs=rngs,
          )
          for i, (cin, cout) in enumerate(pairs)
      ]
  )


class Encoder(nnx.Module):
  """Image [B, H, W, in] -> features [B, H/2^(S-1), W/2^(S-1), latent] for S = len(block_out_channels)."""

  def __init__(
      self,
      *,
      in_channels: int,
      out_channels: int,
      block_out_channels: tuple[int, ...],
      layers_per_block: int,
      norm_num_groups: int,
      mid_block_attention: bool,
      remat: str = "none",
      dtype=None,
      rngs: nnx.Rngs,
  ):
    self.conv_in = conv3x3(in_channels, block_out_channels[0], dtype=dtype, rngs=rngs)
    self.down_blocks = stages(
        block_out_channels,
        num_layers=layers_per_block,
        resample="down",
        norm_num_groups=norm_num_groups,
        remat=remat,
        dtype=dtype,
        rngs=rngs,
    )
    self.mid_block = MidBlock(
        block_out_channels[-1],
        norm_num_groups=norm_num_groups,
        attention=mid_block_attention,
        remat=remat,
        dtype=dtype,
        rngs=rngs,
    )
    self.conv_norm_out = group_norm(block_out_channels[-1], num_groups=norm_num_groups, rngs=rngs)
    self.conv_out = conv3x3(block_out_channels[-1], out_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent features [B, h, w, in] -> image [B, h*2^(S-1), w*2^(S-1), out]; stages run widest first, each
  with one more resnet than the encoder's (as in diffusers)."""

  def __init__(
      self,
      *,
      in_channels: int,
      out_channels: int,
      block_out_channels: tuple[int, ...],
      layers_per_block: int,
      norm_num_groups: int,
      mid_block_attention: bool,
      remat: str = "none",
      dtype=None,
      rngs: nnx.Rngs,
  ):
    widths = tuple(reversed(block_out_channels))
    self.conv_in = conv3x3(in_channels, widths[0], dtype=dtype, rngs=rngs)
    self.mid_block = MidBlock(
        widths[0],
        norm_num_groups=norm_num_groups,
        attention=mid_block_attention,
        remat=remat,
        dtype=dtype,
        rngs=rngs,
    )
    self.up_blocks = stages(
        widths,
        num_layers=layers_per_block + 1,
        resample="up",
        norm_num_groups=norm_num_groups,
        remat=remat,
        dtype=dtype,
        rngs=rngs,
    )
    self.conv_norm_out = group_norm(block_out_channels[0], num_groups=norm_num_groups, rngs=rngs)
    self.conv_out = conv3x3(block_out_channels[0], out_channels, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.mid_block(self.conv_in(x))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class VQGAN(nnx.Module):
  """diffusers `VQModel` (norm_type="group"): encoder, 1x1 quant_conv, quantizer, 1x1 post_quant_conv,
  decoder. `encode` stops before quantization so the continuous latents stay available."""

  def __init__(
      self,
      in_channels: int = 3,
      out_channels: int = 3,
      block_out_channels: tuple[int, ...] = AMUSED_VQGAN["block_out_channels"],
      layers_per_block: int = 2,
      latent_channels: int = 64,
      num_vq_embeddings: int = 8192,
      vq_embed_dim: int = 64,
      norm_num_groups: int = 32,
      mid_block_attention: bool = False,
      remat: str = "none",
      *,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    blocks = dict(
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        mid_block_attention=mid_block_attention,
        remat=remat,
        dtype=dtype,
        rngs=rngs,
    )
    self.encoder = Encoder(in_channels=in_channels, out_channels=latent_channels, **blocks)
    self.quant_conv = conv1x1(latent_channels, vq_embed_dim, dtype=dtype, rngs=rngs)
    self.quantizer = VectorQuantizer(num_vq_embeddings, vq_embed_dim, beta=0.25, rngs=rngs)
    self.post_quant_conv = conv1x1(vq_embed_dim, latent_channels, dtype=dtype, rngs=rngs)
    self.decoder = Decoder(in_channels=latent_channels, out_channels=out_channels, **blocks)

  def encode(self, images: jax.Array) -> jax.Array:
    """[B, H, W, 3] in [-1, 1] -> latents [B, h, w, vq_embed_dim] before quantization, as diffusers'
    `encode(x).latents`. float32 whatever the compute dtype."""
    return self.quant_conv(self.encoder(images)).astype(jnp.float32)

  def quantize(self, latents: jax.Array) -> QuantizerOutput:
    return self.quantizer(latents)

  def decode(self, latents: jax.Array, quantize: bool = True) -> jax.Array:
    """[B, h, w, vq_embed_dim] -> images [B, H, W, 3]; quantize=False decodes the latents as they are
    (diffusers `decode(h, force_not_quantize=True)`)."""
    if quantize:
      latents = self.quantizer(latents).quantized
    return self.decoder(self.post_quant_conv(latents)).astype(jnp.float32)

  def __call__(self, images: jax.Array) -> tuple[jax.Array, QuantizerOutput]:
    """Reconstruction [B, H, W, 3] through the codebook, and the quantizer's output."""
    quantized = self.quantize(self.encode(images))
    return self.decode(quantized.quantized, quantize=False), quantized
