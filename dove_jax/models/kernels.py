"""DOVE's compute-heavy ops, each in two forms: kernels shaped for XLA's CPU backend, and plain XLA.

On the CPU, XLA runs DOVE faster when some ops are written around its CPU compiler (measured in
docs/performance.md): convolutions whose filter gradient is cut into strips, nearest-x2 upsampling folded
into its 3x3 convolution, sums grouped so that they fuse, and causal attention in blocks of queries. On a GPU
or TPU none of that helps, and some of it hurts (the grouped sums' optimisation barrier blocks fusions): there
the ops are XLA's own, and attention is `jax.nn.dot_product_attention`, cuDNN's fused kernel in bf16 on an
NVIDIA GPU.

The choice is made once, when a model is built: each module that has such an op reads `current()` in its
constructor and keeps it as a static attribute, so a compiled function always runs the kernels its model
was built with. "auto" (the default) picks by the backend in use; `DOVE(kernels=...)` and the config's
`model.kernels` force either way (e.g. "xla" on a CPU, to run what a GPU runs).

  cpu       the CPU kernels
  xla       plain XLA ops; attention by `jax.nn.dot_product_attention`'s XLA implementation
  cudnn     as xla, with bf16/fp16 attention through cuDNN (float32 attention stays XLA's)
  auto      cpu on the CPU backend, cudnn on a CUDA GPU, xla elsewhere
  portable  cpu or xla, whichever suits the platform a program is compiled for
            (`jax.lax.platform_dependent`): for functions exported for several (dove_jax/portable.py)
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.extend.backend
import jax.numpy as jnp

CHOICES = ("auto", "cpu", "xla", "cudnn", "portable")
_requested = ["auto"]  # a stack: `use` pushes, its exit pops


def resolve(choice: str) -> str:
  """A choice of CHOICES as it stands, or for "auto" "cpu", "xla" or "cudnn" by the backend in use."""
  if choice not in CHOICES:
    raise ValueError(f"kernels={choice!r} (config model.kernels): expected one of {CHOICES}")
  if choice != "auto":
    return choice
  backend = jax.extend.backend.get_backend()
  if backend.platform == "cpu":
    return "cpu"
  return "cudnn" if "cuda" in backend.platform_version.lower() else "xla"


@contextlib.contextmanager
def use(choice: str):
  """Modules built inside the block take `choice`'s kernels."""
  resolve(choice)  # a wrong name fails here, before anything is built
  _requested.append(choice)
  try:
    yield
  finally:
    _requested.pop()


def current() -> str:
  """The kernels a module built now takes: a choice of CHOICES other than "auto"."""
  return resolve(_requested[-1])


def by_platform(impl: str, cpu_kernel, plain, *args):
  """`cpu_kernel(*args)` or `plain(*args)` as `impl` says; for "portable" both, and the compiler keeps the
  one for its platform."""
  if impl == "portable":
    return jax.lax.platform_dependent(*args, cpu=cpu_kernel, default=plain)
  return (cpu_kernel if impl == "cpu" else plain)(*args)


class UsesKernels:
  """A mixin for a module whose ops are here: `self.kernels` = `current()` when it is built."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.kernels = current()


# -- convolution ---------------------------------------------------------------------------------------

Padding = tuple[tuple[int, int], tuple[int, int]]
MIN_DEPTH = 8  # strips * batch to aim for
MIN_ROWS = 8  # the shortest strip (a halo of kernel-1 rows is repeated per strip)


def conv2d(x: jax.Array, kernel: jax.Array, padding: Padding, impl: str) -> jax.Array:
  """A stride-1 convolution, NHWC x HWIO -> NHWC, padding ((top, bottom), (left, right))."""
  return by_platform(
      impl, lambda x, k: strip_conv2d(x, k, padding), lambda x, k: _conv(x, k, padding), x, kernel
  )


def _conv(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def num_strips(batch: int, out_height: int) -> int:
  """How many strips the CPU filter gradient cuts each image into: enough for a depth of MIN_DEPTH, each
  strip at least MIN_ROWS output rows, dividing the height; 1 = XLA's own gradient."""
  strips = max(1, MIN_DEPTH // batch)
  while strips > 1 and (out_height % strips or out_height // strips < MIN_ROWS):
    strips //= 2
  return strips


def filter_gradient(
    x: jax.Array, dy: jax.Array, kernel_shape: tuple[int, ...], padding: Padding
) -> jax.Array:
  """d loss / d kernel of `_conv(x, kernel, padding)` given dy = d loss / d output, by strips.
  x [B, H, W, Ci], dy [B, H', W', Co] -> [kh, kw, Ci, Co].

  XLA's CPU backend computes a filter gradient as a convolution whose "kernel" is the whole image and whose
  contracted depth is the batch: at batch 1 Eigen gathers single-channel patches, and the filter gradient of
  a 3x3 conv at [1, 256, 256, 128] takes 2-3x its forward pass. Cutting each image into horizontal strips
  (each with the rows its taps reach beyond it repeated) turns the batch of 1 into a batch of 8 strips: the
  same sums, faster at the paper's widths. With a batch of 8 or more (where strips measured no faster) the
  gradient is XLA's own.
  """
  b, out_h, out_w, co = dy.shape
  kh = kernel_shape[0]
  strips = num_strips(b, out_h)
  if strips == 1:
    return jax.vjp(lambda k: _conv(x, k, padding), jnp.zeros(kernel_shape, x.dtype))[1](dy)[0]
  rows = out_h // strips
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))  # [B, H'+kh-1, W+pads, Ci]
  # Strip s reads padded rows s*rows ... s*rows + rows + kh - 2.
  take = (jnp.arange(strips)[:, None] * rows + jnp.arange(rows + kh - 1)[None]).reshape(-1)
  xs = xp[:, take].reshape(
      b * strips, rows + kh - 1, xp.shape[2], x.shape[3]
  )  # [B*S, rows+kh-1, W', Ci]
  dys = dy.reshape(b * strips, rows, out_w, co)  # [B*S, rows, W', Co]
  # The sum over strips and positions as one convolution: batch = Ci, depth = B*S, "kernel" = the strip.
  return jax.lax.conv_general_dilated(
      xs, dys, (1, 1), "VALID", dimension_numbers=("CHWN", "IHWO", "HWNC")
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def strip_conv2d(x: jax.Array, kernel: jax.Array, padding: Padding) -> jax.Array:
  """`_conv`, with its filter gradient by `filter_gradient` (the CPU kernel)."""
  return _conv(x, kernel, padding)


def _strip_conv2d_fwd(x, kernel, padding):
  return _conv(x, kernel, padding), (x, kernel)


def _strip_conv2d_bwd(padding, residuals, dy):
  x, kernel = residuals
  dx = jax.vjp(lambda x: _conv(x, kernel, padding), x)[1](dy)[0]
  return dx, filter_gradient(x, dy, kernel.shape, padding)


strip_conv2d.defvjp(_strip_conv2d_fwd, _strip_conv2d_bwd)


# -- nearest x2 upsampling and a 3x3 convolution -------------------------------------------------------


def upsample_conv3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array, impl: str) -> jax.Array:
  """conv3x3(nearest_upsample_x2(x)) + bias (diffusers' Upsample2D with use_conv=True).
  [B, H, W, C] x [3, 3, C, O] -> [B, 2H, 2W, O]."""
  return by_platform(impl, phase_upsample_conv3x3, _upsampled_conv3x3, x, kernel) + bias


def _upsampled_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  upsampled = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
  return _conv(upsampled, kernel, ((1, 1), (1, 1)))


def _phase_taps(kernel: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """A 3-tap axis of a kernel -> the 2-tap kernels of output phases 0 and 1 after nearest x2 upsampling.

  Output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i; output row 2i+1 reads input rows
  i, i, i+1; so phase 0 applies taps (k0, k1 + k2) to rows (i-1, i) and phase 1 (k0 + k1, k2) to (i, i+1).
  """
  k0, k1, k2 = (jnp.take(kernel, i, axis=axis) for i in range(3))
  return jnp.stack([k0, k1 + k2], axis), jnp.stack([k0 + k1, k2], axis)


def phase_upsample_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """conv3x3(nearest_upsample_x2(x)) without building the upsampled image (the CPU kernel): four 2x2
  convolutions of x, one per output phase, interleaved. 16 instead of 36 multiply-adds per output and input
  channel, 2-2.5x faster on the CPU forward and backward; the same function up to float rounding."""
  b, h, w, _ = x.shape
  pads = ((1, 0), (0, 1))  # phase 0 reads the row (column) before, phase 1 the one after
  phases = [
      [
          strip_conv2d(x, taps, (pads[row], pads[col]))  # [B, H, W, O]
          for col, taps in enumerate(_phase_taps(row_taps, 1))
      ]
      for row, row_taps in enumerate(_phase_taps(kernel, 0))
  ]
  y = jnp.stack([jnp.stack(cols, axis=3) for cols in phases], axis=2)  # [B, H, 2, W, 2, O]
  return y.reshape(b, 2 * h, 2 * w, -1)


# -- sums (the statistics of the norms) ----------------------------------------------------------------

FUSED_SUM_WIDTH = (
    32  # the longest reduction XLA's CPU compiler leaves whole (and fuses with its producer)
)


def sum_over(x: jax.Array, axis: int, impl: str) -> jax.Array:
  """x summed over `axis` (dropped)."""
  return by_platform(impl, lambda x: fused_sum(x, axis), lambda x: x.sum(axis), x)


def fused_sum(x: jax.Array, axis: int) -> jax.Array:
  """x summed over `axis`, by groups of up to 32 neighbours first (the CPU kernel).

  XLA's CPU compiler splits every reduction longer than 32 into a tree of `reduce-window`s (its
  tree-reduction rewriter), and a reduce-window fuses with nothing, so each statistic of a norm first writes
  the whole tensor it sums (the centred activations, their squares) and reads it back. Summing 32 neighbours
  first, behind an optimisation barrier that keeps XLA from merging the two stages back into one long
  reduction, fuses that first stage with its producer and leaves a 32x smaller tensor to the tree.
  """
  axis %= x.ndim
  size = x.shape[axis]
  width = max(d for d in range(1, FUSED_SUM_WIDTH + 1) if size % d == 0)
  if size > FUSED_SUM_WIDTH and width > 1:
    x = x.reshape(x.shape[:axis] + (size // width, width) + x.shape[axis + 1 :]).sum(axis + 1)
    x = jax.lax.optimization_barrier(x)
  return x.sum(axis)


# -- attention -----------------------------------------------------------------------------------------

CAUSAL_BLOCKS = 4  # query blocks of a causal self-attention on the CPU (see blocked_attention)
MIN_CAUSAL_BLOCK = 32  # shorter blocks cost more in per-op overhead than they save


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None,
    is_causal: bool,
    impl: str,
) -> jax.Array:
  """softmax(q k^T / sqrt(H)) v: q [B, T, N, H], k and v [B, L, N, H], mask broadcasting to [B, N, T, L]
  (True = attend) -> [B, T, N, H]. Logits and the softmax are float32 whatever the dtype; a query that sees
  no key gets a finite output, not NaN (its value is meaningless: a caller masks it out)."""
  return by_platform(
      impl,
      lambda q, k, v, mask: blocked_attention(q, k, v, mask, is_causal),
      lambda q, k, v, mask: plain_attention(q, k, v, mask, is_causal, cudnn=impl == "cudnn"),
      q,
      k,
      v,
      mask,
  )


def plain_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None, is_causal: bool, cudnn: bool
) -> jax.Array:
  """`attention` by `jax.nn.dot_product_attention`: cuDNN's where `cudnn` and the dtype is bf16 or fp16 and
  it takes the shapes, XLA's otherwise; a query that sees no key sees every key instead."""
  if mask is not None:
    if is_causal:  # one explicit mask, so that its empty rows can be found
      mask = mask & causal_mask(q.shape[1], k.shape[1], 0)
    mask = mask | ~jnp.any(mask, axis=-1, keepdims=True)  # a row that sees no key sees every key
    mask = jnp.broadcast_to(mask, mask.shape[:-2] + (q.shape[1], k.shape[1]))  # [B, N or 1, T, L]
    is_causal = False
  if cudnn and q.dtype in (jnp.bfloat16, jnp.float16):
    # cuDNN's fused kernel refuses some shapes (an odd length with a mask, a head dim not a multiple of 8)
    # when it is traced: those take XLA's.
    try:
      return jax.nn.dot_product_attention(
          q, k, v, mask=mask, is_causal=is_causal, implementation="cudnn"
      )
    except NotImplementedError:
      pass
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")


def blocked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, is_causal: bool = False
) -> jax.Array:
  """`attention` as the CPU kernel, about twice as fast as `jax.nn.dot_product_attention` on XLA's CPU
  backend: heads go first so both products are plain batched matmuls, and the softmax is normalised after
  the product with v, dividing [B, N, T, H] rather than [B, N, T, L]. A query that sees no key gets the mean
  of all values.

  Causal attention (is_causal) runs in CAUSAL_BLOCKS blocks of queries, each against the keys up to its
  last query only: about 5/8 of the logits of the whole [T, L] square (none of which the mask would keep),
  each block's small enough to stay in cache. Tiny generator's attention ([8, 320, 4, 16]): forward 8.0 ->
  6.2 ms, value and gradient 16.4 -> 11.6 ms; paper ([1, 512, 8, 64]) 6.3 -> 4.6 and 19.2 -> 13.7 ms.
  """
  if not is_causal:
    return _attention(q, k, v, mask)
  length = q.shape[1]
  block = -(-length // CAUSAL_BLOCKS)
  block = block if block >= MIN_CAUSAL_BLOCK else length  # short sequences: one block
  outputs = []
  for start in range(0, length, block):
    stop = min(start + block, length)
    keys = min(stop, k.shape[1])  # query i sees keys 0..i: none past the block's last query
    seen = causal_mask(stop - start, keys, start)  # [T_block, keys]
    if mask is not None:  # its rows (if it has them) and keys of this block
      rows = slice(start, stop) if mask.shape[-2] > 1 else slice(None)
      seen = mask[..., rows, :keys] & seen
    outputs.append(_attention(q[:, start:stop], k[:, :keys], v[:, :keys], seen))
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)  # [B, T, N, H]


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
  """blocked_attention, a given mask only (q [B, T, N, H], k and v [B, L, N, H]) -> [B, T, N, H]."""
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q * scale, k, v))  # [B, N, T or L, H]
  logits = jnp.matmul(
      q, jnp.swapaxes(k, -1, -2), preferred_element_type=jnp.float32
  )  # [B, N, T, L]
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  # The max only keeps exp in range and cancels in the normalisation: no gradient through it, which spares
  # the backward pass the compare-and-select ops of max's gradient over all of [B, N, T, L].
  shift = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  weights = jnp.exp(logits - shift)  # [B, N, T, L], unnormalised
  out = jnp.matmul(weights.astype(v.dtype), v) / jnp.sum(weights, axis=-1, keepdims=True).astype(
      v.dtype
  )
  return jnp.swapaxes(out, 1, 2)  # [B, T, N, H]


def causal_mask(num_queries: int, num_keys: int, offset) -> jax.Array:
  """[T, L] bool: query i, at index offset + i of the sequence, sees keys 0..offset + i."""
  return jnp.arange(num_keys)[None, :] <= offset + jnp.arange(num_queries)[:, None]
