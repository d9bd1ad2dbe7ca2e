"""GPT-NeoX (Pythia) transformer blocks, mirroring transformers' `GPTNeoXModel` without its token embedding.

DOVE uses this layout twice: the causal dynamic token generator (initialised from Pythia) and the bidirectional
token decoder. Both feed continuous embeddings, so the module takes [B, L, D] inputs and returns the hidden
states after the final LayerNorm (= `GPTNeoXModel(...).last_hidden_state`).

Numerics follow Pythia: partial rotary embedding on the first `rotary_pct` of each head's dims (rotate_half
convention), parallel residual x + attn(ln1(x)) + mlp(ln2(x)), exact (erf) GELU, biases on every projection.
The fused qkv projection keeps Pythia's `query_key_value` output layout, [heads, (q, k, v), head_dim], so a
checkpoint converts with a plain transpose.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from dove_jax.models import kernels, remat as remat_lib
from dove_jax.models.norms import LayerNorm

PYTHIA_14M = dict(num_layers=6, d_model=128, num_heads=4, mlp_dim=512)
PYTHIA_70M = dict(num_layers=6, d_model=512, num_heads=8, mlp_dim=2048)
PRESETS = {"pythia-14m": PYTHIA_14M, "pythia-70m": PYTHIA_70M}


def rotary_cos_sin(
    positions: jax.Array, rotary_dim: int, base: float
) -> tuple[jax.Array, jax.Array]:
  """cos and sin of the rotary phases, [B, L, rotary_dim] each, float32.

  Frequencies are repeated as [f, f] (not interleaved) to pair with `rotate_half`, as transformers does.
  """
  inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))  # [R/2]
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, R/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B, L, R]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates the first R dims of each head of x [B, L, N, H] by the phases cos/sin [B, L, R]; the rest pass."""
  rotary_dim = cos.shape[-1]
  x_rot, x_pass = x[..., :rotary_dim].astype(jnp.float32), x[..., rotary_dim:]
  first, second = jnp.split(x_rot, 2, axis=-1)  # [B, L, N, R/2] each
  rotated = jnp.concatenate([-second, first], axis=-1)  # rotate_half, [B, L, N, R]
  x_rot = x_rot * cos[:, :, None] + rotated * sin[:, :, None]
  return jnp.concatenate([x_rot.astype(x.dtype), x_pass], axis=-1)


def layer_norm(d_model: int, eps: float, *, rngs: nnx.Rngs) -> LayerNorm:
  """A float32 LayerNorm whatever the compute dtype (bf16 would round away small residual updates), with
  PyTorch's two-pass variance rather than Flax's E[x^2] - E[x]^2 shortcut."""
  return LayerNorm(d_model, epsilon=eps, dtype=jnp.float32, use_fast_variance=False, rngs=rngs)


class KVCache(NamedTuple):
  """One causal block's keys and values for a whole sequence, [B, L_total, N, H] each; static shape, filled
  chunk by chunk, so one compiled loop serves every length."""

  keys: jax.Array
  values: jax.Array


class NeoXBlock(nnx.Module):
  """One GPT-NeoX layer with parallel residual: x + attn(ln1(x)) + mlp(ln2(x)).

  `causal` is fixed at construction so the attention kernel can specialise on it; padding comes per call
  through `key_mask`; a query that sees no valid key (a padded slot under left padding and causal
  attention) gets a finite but meaningless output. LayerNorms always run in float32 and the attention softmax
  is float32 (see `kernels.attention`), so a bfloat16 `dtype` only lowers the matmuls; the
  residual stream keeps the input's dtype.
  """

  def __init__(
      self,
      d_model: int,
      num_heads: int,
      mlp_dim: int,
      *,
      rotary_pct: float = 0.25,
      rotary_base: float = 10000.0,
      layer_norm_eps: float = 1e-5,
      causal: bool,
      dtype=None,
      rngs: nnx.Rngs,
  ):
    if d_model % num_heads:
      raise ValueError(f"d_model {d_model} is not a multiple of num_heads {num_heads}")
    self.num_heads = num_heads
    self.head_dim = d_model // num_heads
    self.rotary_dim = int(self.head_dim * rotary_pct)  # int() truncates, as transformers does
    self.rotary_base = rotary_base
    self.causal = causal
    self.kernels = kernels.current()
    self.attn_norm = layer_norm(d_model, layer_norm_eps, rngs=rngs)
    self.mlp_norm = layer_norm(d_model, layer_norm_eps, rngs=rngs)
    self.qkv = nnx.Linear(d_model, 3 * d_model, dtype=dtype, rngs=rngs)
    self.attn_out = nnx.Linear(d_model, d_model, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(d_model, mlp_dim, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_dim, d_model, dtype=dtype, rngs=rngs)

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      key_mask: jax.Array | None,
      num_outputs: int | None = None,
  ) -> jax.Array:
    """x [B, L, D], positions [B, L] int32, key_mask [B, L] bool (False = padding no query sees) -> [B, T, D].

    T = num_outputs (default L): only the last T positions are computed as queries and returned, while all
    L serve as keys; a last block whose caller reads only those skips the rest of the attention and MLP.
    """
    length = x.shape[1]
    q, k, v = self.rotated_qkv(self.attn_norm(x), positions)  # [B, L, N, H] each
    mask = (
        None if key_mask is None else key_mask[:, None, None, :]
    )  # [B, 1, 1, L] over [B, N, T, L]
    if num_outputs is None or num_outputs == length:
      return self.residual(x, self.attention(q, k, v, mask, self.causal))
    q, x = q[:, -num_outputs:], x[:, -num_outputs:]  # [B, T, N, H], [B, T, D]
    if self.causal:
      seen = kernels.causal_mask(num_outputs, length, length - num_outputs)[
          None, None
      ]  # [1, 1, T, L]
      mask = seen if mask is None else mask & seen
    return self.residual(x, self.attention(q, k, v, mask))

  def residual(self, x: jax.Array, attended: jax.Array) -> jax.Array:
    """The parallel residual of queries x [B, T, D] with their attention outputs [B, T, N, H]."""
    return x + self.attn_out(attended.reshape(x.shape)) + self.mlp(self.mlp_norm(x))

  def rotated_qkv(
      self, x: jax.Array, positions: jax.Array
  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x [B, L, D] -> q, k, v [B, L, N, H], with the rotary phases of `positions` on q and k."""
    batch, length, _ = x.shape
    qkv = self.qkv(x).reshape(batch, length, self.num_heads, 3, self.head_dim)  # [B, L, N, 3, H]
    q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]  # [B, L, N, H] each
    cos, sin = rotary_cos_sin(positions, self.rotary_dim, self.rotary_base)  # [B, L, R]
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

  def extend(
      self,
      x: jax.Array,
      positions: jax.Array,
      cache: KVCache,
      offset: jax.Array | int,
      key_mask: jax.Array,
      *,
      compute_output: bool = True,
  ) -> tuple[jax.Array | None, KVCache]:
    """The block on a chunk that sits at `offset` of a longer causal sequence whose earlier keys and values
    are in `cache`: x [B, C, D] -> ([B, C, D], the cache with this chunk's keys and values written in).

    Only causal blocks have a cache: a chunk's queries see the cache up to their own index (so slots not
    yet written are never read), except where `key_mask` [B, L_total] is False (padding). With
    compute_output=False only the cache is written (the output is None): what a last block needs for a
    prefix whose own outputs nobody reads.
    """
    if not self.causal:
      raise ValueError(
          "a key/value cache serves causal blocks only: a bidirectional query sees later keys"
      )
    q, k, v = self.rotated_qkv(self.attn_norm(x), positions)  # [B, C, N, H] each
    cache = KVCache(
        jax.lax.dynamic_update_slice_in_dim(cache.keys, k.astype(cache.keys.dtype), offset, 1),
        jax.lax.dynamic_update_slice_in_dim(cache.values, v.astype(cache.values.dtype), offset, 1),
    )
    if not compute_output:
      return None, cache
    chunk = x.shape[1]
    # A static offset (the prefix) reads only the keys up to its chunk's end: sliced, not masked.
    seen = offset + chunk if isinstance(offset, int) else cache.keys.shape[1]
    mask = (
        kernels.causal_mask(chunk, seen, offset)[None, None] & key_mask[:, None, None, :seen]
    )  # [B, 1, C, seen]
    out = self.attention(q, cache.keys[:, :seen], cache.values[:, :seen], mask)  # [B, C, N, H]
    return self.residual(x, out), cache

  def attention(self, q, k, v, mask, is_causal: bool = False) -> jax.Array:
    """`kernels.attention` with this block's kernels: q [B, T, N, H], k and v [B, L, N, H] -> [B, T, N, H]."""
    return kernels.attention(q, k, v, mask, is_causal, self.kernels)

  def mlp(self, x: jax.Array) -> jax.Array:
    return self.mlp_out(jax.nn.gelu(self.mlp_in(x), approximate=False))


class NeoXTransformer(nnx.Module):
  """A stack of NeoXBlocks and the final LayerNorm; the output is GPTNeoXModel's last_hidden_state.

  The architecture hyper-parameters are kept as attributes so a converter can check a checkpoint's config
  against the model it fills.
  """

  def __init__(
      self,
      *,
      num_layers: int,
      d_model: int,
      num_heads: int,
      mlp_dim: int,
      causal: bool,
      rotary_pct: float = 0.25,
      rotary_base: float = 10000.0,
      layer_norm_eps: float = 1e-5,
      dtype=None,
      remat: str = "none",
      rngs: nnx.Rngs,
  ):
    self.remat = remat_lib.check(remat)
    self.num_layers, self.d_model, self.num_heads, self.mlp_dim = (
        num_layers,
        d_model,
        num_heads,
        mlp_dim,
    )
    self.rotary_pct, self.rotary_base, self.layer_norm_eps = rotary_pct, rotary_base, layer_norm_eps
    self.layers = nnx.List(
        [
            NeoXBlock(
                d_model,
                num_heads,
                mlp_dim,
                rotary_pct=rotary_pct,
                rotary_base=rotary_base,
                layer_norm_eps=layer_norm_eps,
                causal=causal,
                dtype=dtype,
                rngs=rngs,
            )
            for _ in range(num_layers)
        ]
    )
    self.final_norm = layer_norm(d_model, layer_norm_eps, rngs=rngs)

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array | None = None,
      key_mask: jax.Array | None = None,
      num_outputs: int | None = None,
  ) -> jax.Array:
    """x [B, L, D] -> [B, T, D] float32. positions [B, L] default to 0..L-1; key_mask [B, L], False = padding.

    T = num_outputs (default L): the hidden states of the last T positions only, which the last block then
    computes alone (what DOVE reads: the generator's slots, the decoder's latent queries).
    """
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])  # [B, L]
    run = remat_lib.checkpointed(
        _run_block, self.remat, static_argnums=4
    )  # what the backward pass keeps
    for i, layer in enumerate(self.layers):
      x = run(layer, x, positions, key_mask, num_outputs if i == len(self.layers) - 1 else None)
    return self.final_norm(x)

  def init_cache(self, batch: int, length: int) -> list[KVCache]:
    """An empty cache per layer for `length` positions, in the dtype the keys are computed in."""
    qkv = self.layers[0].qkv
    dtype = qkv.dtype or qkv.kernel.dtype
    shape = (batch, length, self.num_heads, self.d_model // self.num_heads)  # [B, L_total, N, H]
    return [KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in self.layers]

  def extend(
      self,
      x: jax.Array,
      positions: jax.Array,
      caches: list[KVCache],
      offset: jax.Array | int,
      key_mask: jax.Array,
      *,
      compute_output: bool = True,
  ) -> tuple[jax.Array | None, list[KVCache]]:
    """A chunk x [B, C, D] at `offset` of a causal sequence whose earlier positions are in `caches`:
    -> (hidden states [B, C, D] float32, the caches with the chunk written in). Running a sequence chunk by
    chunk gives what `__call__` gives on the whole of it; key_mask [B, L_total] covers the whole sequence.
    compute_output=False only fills the caches (the last block stops at its keys and values; output None).
    """
    new_caches = []
    for i, (layer, cache) in enumerate(zip(self.layers, caches)):
      needed = compute_output or i < len(self.layers) - 1
      x, cache = layer.extend(x, positions, cache, offset, key_mask, compute_output=needed)
      new_caches.append(cache)
    return (self.final_norm(x) if compute_output else None), new_caches


def _run_block(layer: NeoXBlock, x, positions, key_mask, num_outputs):
  return layer(x, positions, key_mask, num_outputs)
