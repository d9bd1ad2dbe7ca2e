"""DOVE, the top module: image -> VQGAN encoder -> H_v -> generator -> tokens + EOS -> mask -> token decoder
-> latent grid -> VQGAN decoder -> image.

Images are NHWC floats in [-1, 1] at the model's `image_size` (static shapes: one compiled function per
size). Every sequence has `max_tokens` slots; a shorter one is the same array with a mask.

Q-DOVE is the same module with a query vocabulary (`query_vocab_size` > 0): a text query, as token ids
padded to a fixed length with a mask, is embedded and read by the generator between H_v and the output slots,
so the tokens can spend themselves on the region the query asks about. An all-padding query is no query.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx, struct

from dove_jax import weights
from dove_jax.models import buckets, eos, kernels as kernels_lib, neox
from dove_jax.models.generator import TokenGenerator
from dove_jax.models.quantizer import QuantizerOutput
from dove_jax.models.token_decoder import TokenDecoder
from dove_jax.models.vqgan import AMUSED_VQGAN, VQGAN


@struct.dataclass
class Tokens:
  """A batch of variable-length token sequences, padded to `max_tokens` slots."""

  tokens: jax.Array  # [B, n, D], exactly zero after each image's length
  mask: jax.Array  # [B, n] bool, True for the kept slots 1..length
  lengths: jax.Array  # [B] int32
  eos_prob: jax.Array  # [B, n] float32


@struct.dataclass
class DOVEOutput:
  """A forward pass with everything the losses need."""

  reconstruction: jax.Array  # [B, H, W, 3]
  tokens: Tokens
  features: jax.Array  # [B, h, w, C] H_v, what the generator read
  latents: jax.Array  # [B, h, w, C] what the token decoder wrote, before the VQGAN decoder
  vq: QuantizerOutput | None  # the quantizer on H_v, when `quantize_features` is set


def _transformer_kwargs(spec: str | dict) -> dict:
  """A preset name ('pythia-70m') or explicit NeoXTransformer arguments."""
  if isinstance(spec, str):
    if spec not in neox.PRESETS:
      raise ValueError(
          f"unknown transformer preset {spec!r}; choose from {sorted(neox.PRESETS)} "
          "or give num_layers/d_model/num_heads/mlp_dim"
      )
    return dict(neox.PRESETS[spec])
  return dict(spec)


class DOVE(nnx.Module):
  """Dynamic Output Vision Encoder (Mao et al., 2025).

  Args mirror the `model` section of `configs/dove.py`:
    image_size: input height = width in pixels.
    vqgan: VQGAN keyword arguments (default: the aMUSEd VQ-GAN, 146M parameters).
    generator, decoder: a GPT-NeoX preset name or its keyword arguments.
    max_tokens: n, the number of output slots.
    eos_threshold: an EOS fires where its probability exceeds this.
    quantize_features: feed the generator the quantized H_v (the paper does not say; default: continuous).
    requantize_output: snap the token decoder's latents to the codebook before the VQGAN decoder.
    eos_bias_init: initial EOS logit bias; negative starts every image at full length.
    token_dim: > 0 projects each token to this many dims (a narrower token holds less, so quality rises
      with every token added); 0 = the generator's width, as the paper's tokens are Pythia's hidden states.
    dtype: compute dtype of the convolutions and matmuls, e.g. "bfloat16" (parameters stay float32; norms,
      softmaxes, the quantizer and the VQ-GAN's outputs are float32); None or "" = float32.
    remat: what the backward pass keeps of each VQ-GAN resnet block and transformer block: "none",
      "save_matmuls" or "blocks" (see `dove_jax.models.remat`).
    kernels: "auto" (by the backend), "cpu", "xla" or "cudnn": how the convolutions, norms and attention
      are computed (see `dove_jax.models.kernels`). Not saved by `save_pretrained`: it belongs to the machine
      a model runs on, not to the model.
    query_vocab_size: > 0 makes a Q-DOVE: the size of the query tokenizer's vocabulary (257 for the byte
      tokenizer, Pythia's 50304 for its GPT-NeoX tokenizer, whose embedding then starts the query's).
  """

  def __init__(
      self,
      *,
      image_size: int = 256,
      vqgan: dict | None = None,
      generator: str | dict = "pythia-70m",
      decoder: str | dict = "pythia-70m",
      max_tokens: int = 256,
      eos_threshold: float = 0.5,
      quantize_features: bool = False,
      requantize_output: bool = False,
      eos_bias_init: float = -4.0,
      token_dim: int = 0,
      dtype=None,
      remat: str = "none",
      query_vocab_size: int = 0,
      kernels: str = "auto",
      rngs: nnx.Rngs,
  ):
    # Every keyword argument but rngs (taken before any is rebound, so a new one is saved too) as JSON, a
    # static string that keeps the graph hashable: what `save_pretrained` writes to rebuild this model.
    arguments = {
        name: value for name, value in locals().items() if name not in ("self", "rngs", "kernels")
    }
    arguments["dtype"] = str(jnp.dtype(dtype)) if dtype else None
    self.arguments = json.dumps(
        arguments, sort_keys=True, default=dict
    )  # ConfigDicts as plain dicts
    with kernels_lib.use(kernels):  # what every submodule built here computes with
      vqgan = dict(AMUSED_VQGAN if vqgan is None else vqgan)
      downsample = 2 ** (len(vqgan["block_out_channels"]) - 1)
      if image_size % downsample:
        raise ValueError(
            f"image_size {image_size} is not a multiple of the VQGAN's downsampling {downsample}"
        )
      dtype = jnp.dtype(dtype) if dtype else None
      self.image_size = image_size
      self.max_tokens = max_tokens
      self.eos_threshold = eos_threshold
      self.quantize_features = quantize_features
      self.requantize_output = requantize_output
      latent_dim = vqgan["vq_embed_dim"]
      generator = dict(_transformer_kwargs(generator), remat=remat)
      self.vqgan = VQGAN(**vqgan, remat=remat, dtype=dtype, rngs=rngs)
      grid_size = image_size // downsample
      self.generator = TokenGenerator(
          feature_dim=latent_dim,
          grid_size=grid_size,
          max_tokens=max_tokens,
          transformer=generator,
          eos_bias_init=eos_bias_init,
          token_dim=token_dim,
          dtype=dtype,
          rngs=rngs,
      )
      self.token_decoder = TokenDecoder(
          token_dim=token_dim or generator["d_model"],
          latent_dim=latent_dim,
          grid_size=grid_size,
          transformer=dict(_transformer_kwargs(decoder), remat=remat),
          dtype=dtype,
          rngs=rngs,
      )
      # H_q: query tokens in the generator's input space (Pythia's own input embedding when converted).
      self.query_embed = (
          nnx.Embed(
              query_vocab_size,
              generator["d_model"],
              embedding_init=nnx.initializers.normal(0.02),
              rngs=rngs,
          )
          if query_vocab_size
          else None
      )

  # -- the public API -----------------------------------------------------------------------------------

  @classmethod
  def from_pretrained(cls, directory: str | Path, kernels: str = "auto") -> DOVE:
    """The model a `save_pretrained` folder holds (config.json + model.safetensors), nothing else needed,
    computing with `kernels` (see the class's arguments).

    Raises FileNotFoundError naming a missing file, ValueError naming every parameter whose tensor does not
    fit the config (with both shapes).
    """
    arguments = weights.read_model_arguments(directory)
    model = weights.shaped_model(lambda: cls(**arguments, kernels=kernels, rngs=nnx.Rngs(0)))
    weights.load_weights(model, Path(directory) / weights.MODEL_WEIGHTS)
    return model

  def encode(
      self,
      images: jax.Array,
      token_budget: jax.Array | int | None = None,
      query: jax.Array | None = None,
      query_mask: jax.Array | None = None,
      *,
      chunk_size: int = 0,
  ) -> Tokens:
    """images [B, H, W, 3] in [-1, 1] -> Tokens. `token_budget` (int or [B]; <= 0 = predicted) forces lengths.

    Q-DOVE only: `query` [B, Q] int token ids and `query_mask` [B, Q] bool (False = padding; default: all
    True). A row of padding only is an empty query: the image is encoded as a whole.

    chunk_size > 0 generates the slots that many at a time with a key/value cache and stops once every image
    has its length (`TokenGenerator.generate`): the same Tokens, cheaper when sequences are short.
    """
    return self._encode(images, token_budget, query, query_mask, chunk_size)[0]

  def decode(self, tokens: Tokens, bucket_sizes: tuple[int, ...] | None = None) -> jax.Array:
    """Tokens -> images [B, H, W, 3] (about [-1, 1]).

    bucket_sizes (e.g. `buckets.bucket_sizes(max_tokens)`): the token decoder reads only the smallest bucket
    of slots that holds every kept one (`buckets.decode_latents`): the same images, cheaper when the batch's
    sequences are short. None reads all n slots.
    """
    return self._decode(tokens, bucket_sizes)[0]

  def __call__(
      self,
      images: jax.Array,
      token_budget: jax.Array | int | None = None,
      query: jax.Array | None = None,
      query_mask: jax.Array | None = None,
  ) -> DOVEOutput:
    tokens, features, vq = self._encode(images, token_budget, query, query_mask)
    reconstruction, latents = self._decode(tokens)
    return DOVEOutput(reconstruction, tokens, features, latents, vq)

  # -- the steps ----------------------------------------------------------------------------------------

  def _encode(self, images, token_budget, query=None, query_mask=None, chunk_size=0):
    check_images(images, self.image_size)
    if query is not None:
      query, query_mask = self._embed_query(query, query_mask, images.shape[0])
    features = self.vqgan.encode(images)  # [B, h, w, C]
    vq = None
    if self.quantize_features:
      vq = self.vqgan.quantize(features)
      features = vq.quantized
    b, h, w, c = features.shape
    grid = features.reshape(b, h * w, c)  # [B, P, C]
    tokens, eos_prob = (
        self.generator.generate(
            grid,
            query,
            query_mask,
            token_budget=token_budget,
            threshold=self.eos_threshold,
            chunk_size=chunk_size,
        )
        if chunk_size
        else self.generator(grid, query, query_mask)
    )  # [B, n, D], [B, n]
    mask, lengths = eos.eos_mask(eos_prob, token_budget, self.eos_threshold)
    return Tokens(eos.apply_mask(tokens, mask), mask, lengths, eos_prob), features, vq

  def _embed_query(self, query, query_mask, batch: int):
    """ids [B, Q] (+ mask) -> H_q [B, Q, D] and the mask [B, Q], after checking what can be checked."""
    if self.query_embed is None:
      raise ValueError(
          "this DOVE reads no query (model.query_vocab_size = 0); build a Q-DOVE "
          "(configs/qdove.py) or leave the query out"
      )
    if query.ndim != 2 or query.shape[0] != batch or not jnp.issubdtype(query.dtype, jnp.integer):
      raise ValueError(
          f"query must be int token ids of shape [{batch}, Q]; got {query.dtype} {query.shape}"
      )
    query_mask = jnp.ones(query.shape, bool) if query_mask is None else query_mask
    if query_mask.shape != query.shape:
      raise ValueError(f"query_mask shape {query_mask.shape} != query shape {query.shape}")
    if not isinstance(query, jax.core.Tracer):
      vocab = self.query_embed.num_embeddings
      with jax.ensure_compile_time_eval():
        lo, hi = int(jnp.min(query, initial=0)), int(jnp.max(query, initial=0))
      if lo < 0 or hi >= vocab:
        raise ValueError(
            f"query token ids must lie in [0, {vocab}) (model.query_vocab_size = {vocab}); got "
            f"ids in [{lo}, {hi}]: the tokenizer and the model disagree"
        )
    return self.query_embed(query), query_mask

  def _decode(self, tokens: Tokens, bucket_sizes=None):
    latents = (
        buckets.decode_latents(self.token_decoder, tokens, tuple(bucket_sizes))
        if bucket_sizes
        else self.token_decoder(tokens.tokens, tokens.mask)
    )  # [B, h, w, C]
    return self.vqgan.decode(latents, quantize=self.requantize_output), latents


def check_images(images, image_size: int) -> None:
  """Rejects what DOVE cannot read, with the fix in the message. The range is only checked on concrete
  arrays (outside `jax.jit`), where reading it costs nothing extra."""
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4 or shape[-1] != 3:
    raise ValueError(
        f"images must be NHWC with 3 channels, shape [B, {image_size}, {image_size}, 3]; "
        f"got shape {shape}"
    )
  if tuple(shape[1:3]) != (image_size, image_size):
    raise ValueError(
        f"images must be {image_size}x{image_size} (the model's image_size); "
        f"got {shape[1]}x{shape[2]}"
    )
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(
        f"images must be floats in [-1, 1]; got dtype {images.dtype} "
        "(for uint8 use images / 127.5 - 1)"
    )
  if not isinstance(images, jax.core.Tracer):
    with (
        jax.ensure_compile_time_eval()
    ):  # a concrete array closed over by a jitted function stays concrete
      lo, hi = float(jnp.min(images)), float(jnp.max(images))
    if lo < -1.001 or hi > 1.001:
      raise ValueError(
          f"images must be in [-1, 1]; got values in [{lo:.3g}, {hi:.3g}] "
          "(for [0, 1] inputs use 2 * images - 1)"
      )
