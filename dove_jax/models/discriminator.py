"""The patch discriminator of the GAN term in L_rec: taming-transformers' (VQGAN's) `NLayerDiscriminator`."""

from __future__ import annotations

import math

import jax
from flax import nnx

from dove_jax.models.norms import GroupNorm

# taming's weights_init: conv kernels drawn from N(0, 0.02).
_CONV_INIT = nnx.initializers.normal(0.02)


def conv4x4(
    in_channels: int, out_channels: int, *, stride: int, use_bias: bool, rngs: nnx.Rngs
) -> nnx.Conv:
  """A 4x4 conv with torch's padding=1 on every side."""
  return nnx.Conv(
      in_channels,
      out_channels,
      (4, 4),
      strides=stride,
      padding=((1, 1), (1, 1)),
      use_bias=use_bias,
      kernel_init=_CONV_INIT,
      rngs=rngs,
  )


class PatchDiscriminator(nnx.Module):
  """PatchGAN: images [B, H, W, C] -> one real/fake logit per overlapping patch [B, h, w, 1].

  As taming's `NLayerDiscriminator`: 4x4 convs, the first `num_layers` with stride 2 and two more with
  stride 1, LeakyReLU(0.2), channels doubling from `base_channels` up to 8x, a final conv to one channel.
  With num_layers=3 a 256 px image gives a 30x30 logit map (each logit sees a 70x70 patch), 64 px gives 6x6.

  One change: taming's BatchNorm is a GroupNorm here (32 groups, fewer where the width needs it). Batch
  statistics would make each image's logits depend on the rest of the batch (real and fake batches would
  normalise differently) and would need running averages threaded through the functional train step;
  GroupNorm normalises each image alone and is stateless. As in taming, a conv followed by a norm has no
  bias: the norm's shift takes its place.
  """

  def __init__(
      self, *, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, rngs: nnx.Rngs
  ):
    widths = [base_channels * min(2**i, 8) for i in range(num_layers + 1)]  # 64, 128, 256, 512
    self.conv_in = conv4x4(in_channels, widths[0], stride=2, use_bias=True, rngs=rngs)
    strides = [2] * (num_layers - 1) + [1]
    self.convs = nnx.List(
        [
            conv4x4(cin, cout, stride=s, use_bias=False, rngs=rngs)
            for cin, cout, s in zip(widths[:-1], widths[1:], strides)
        ]
    )
    self.norms = nnx.List(
        [GroupNorm(cout, num_groups=math.gcd(32, cout), rngs=rngs) for cout in widths[1:]]
    )
    self.conv_out = conv4x4(widths[-1], 1, stride=1, use_bias=True, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:  # [B, H, W, C] -> [B, h, w, 1]
    x = nnx.leaky_relu(self.conv_in(images), 0.2)
    for conv, norm in zip(self.convs, self.norms):
      x = nnx.leaky_relu(norm(conv(x)), 0.2)
    return self.conv_out(x)
