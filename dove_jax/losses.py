"""The losses of DOVE training (DOVE.md, Training): L_rec per image, the EOS length loss with its dynamic
threshold, the lambda_eos schedule and the patch-GAN losses; and Q-DOVE's per-box and outside-box terms
(L_qry = mean over the query's boxes of L_rec on each box's crop + lambda_o * MSE outside every box).

Every function is pure, with static shapes and no Python branch on array values, so all of them trace once
inside a jitted train step. Losses are per image ([B]) where the paper's formula is per image; the train step
takes the batch mean.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

GAN_KINDS = ("hinge", "non_saturating")
SCHEDULE_KINDS = ("exponential", "linear", "constant")


def mse_per_image(x: jax.Array, y: jax.Array) -> jax.Array:
  """[B, H, W, C] x2 -> [B]: mean squared error over H, W and C, in float32."""
  diff = x.astype(jnp.float32) - y.astype(jnp.float32)
  return jnp.mean(jnp.square(diff), axis=tuple(range(1, diff.ndim)))


def reconstruction_loss(
    mse: jax.Array,
    lpips: jax.Array,
    gan: jax.Array,
    *,
    mse_weight: float = 1.0,
    lpips_weight: float = 0.1,
    gan_weight: float = 5e-10,
) -> jax.Array:
  """The paper's L_rec per image: [B] x3 -> [B]. The tiny GAN weight is the paper's: it avoids
  hallucinated detail."""
  return mse_weight * mse + lpips_weight * lpips + gan_weight * gan


def eos_length_loss(
    eos_prob: jax.Array, lengths: jax.Array, rec_loss: jax.Array, threshold: jax.Array
) -> jax.Array:
  """L_eos per image: [B, n] -> [B].

  An image reconstructed worse than the threshold (L_rec > threshold) needs more tokens: its loss is
  p_eos(m), which pushes down the EOS where it stops now. Any other image can do with fewer: its loss is
  -(1/(m-1)) * sum_{i<m} p_eos(i), which pushes up the EOS of every earlier slot (0 when m = 1: nothing is
  shorter).

  Args:
    eos_prob: [B, n] per-slot EOS probabilities.
    lengths: [B] int, m: the 1-based slot the image stopped at (its length, 1 <= m <= n).
    rec_loss: [B] L_rec per image; a constant here (gradients reach eos_prob only).
    threshold: [] the dynamic threshold (`threshold_value`); a constant here.
  """
  slots = jnp.arange(1, eos_prob.shape[-1] + 1)[None, :]  # [1, n]
  m = lengths[:, None]  # [B, 1]
  # Selects, not products with 0/1 masks: each branch's gradient reaches exactly its own slots.
  at_stop = jnp.sum(jnp.where(slots == m, eos_prob, 0.0), axis=1)  # [B] p_eos(m)
  before_stop = jnp.sum(jnp.where(slots < m, eos_prob, 0.0), axis=1)  # [B] sum_{i<m} p_eos(i)
  fewer = -before_stop / jnp.maximum(lengths - 1, 1)  # the sum is empty when m = 1
  needs_more = jax.lax.stop_gradient(rec_loss) > jax.lax.stop_gradient(threshold)  # [B]
  return jnp.where(needs_more, at_stop, fewer)


def threshold_buffer(size: int = 100) -> dict[str, jax.Array]:
  """The dynamic EOS threshold's state: the mean L_rec of the images trained at their own length, over the
  last `size` steps that had any, in a ring buffer.

  A plain dict of arrays, so it lives in the train state and goes into checkpoints as it is.
  values: [size] float32; count: [] int32, the number of steps recorded so far.
  """
  return dict(values=jnp.zeros((size,), jnp.float32), count=jnp.zeros((), jnp.int32))


def threshold_update(
    buffer: dict[str, jax.Array], rec_loss: jax.Array, weights: jax.Array
) -> dict[str, jax.Array]:
  """Records one step's weighted mean of the per-image L_rec ([B], weights [B]) at slot count % size,
  overwriting the oldest once full; a step whose weights are all 0 records nothing.

  The weights pick the images L_eos compares with the threshold (those at their own length): an image
  trained at a random forced length has on average half the tokens and a larger L_rec, which would inflate
  the threshold. Weighted-out images add nothing, even an inf or NaN loss; the no-op is a select, so the
  shapes stay static under jit.
  """
  values, count = buffer["values"], buffer["count"]
  rec_loss, weights = jax.lax.stop_gradient(rec_loss), jax.lax.stop_gradient(weights)
  total = jnp.sum(weights)
  value = jnp.sum(jnp.where(weights > 0, rec_loss * weights, 0.0)) / jnp.where(
      total > 0, total, 1.0
  )
  recorded = total > 0
  values = jnp.where(
      recorded, values.at[count % values.shape[0]].set(value.astype(values.dtype)), values
  )
  return dict(values=values, count=count + recorded.astype(count.dtype))


def threshold_value(buffer: dict[str, jax.Array]) -> jax.Array:
  """[] the mean of the recorded entries (the last min(count, size) steps).

  Take it before recording the current step. With nothing recorded yet it is -inf, so every image counts as
  needing more tokens (L_rec > -inf): until there is a history to compare with, no image is pushed shorter.
  """
  values, count = buffer["values"], buffer["count"]
  filled = jnp.minimum(count, values.shape[0])
  total = jnp.sum(jnp.where(jnp.arange(values.shape[0]) < filled, values, 0.0))
  return jnp.where(filled > 0, total / jnp.maximum(filled, 1), -jnp.inf)


def eos_weight_schedule(
    *, start: float = 1e-6, end: float, warmup_steps: int, kind: str = "exponential"
) -> optax.Schedule:
  """lambda_eos(step): tiny at first, growing to `end` over `warmup_steps`, then held at `end`.

  The paper says only that lambda_eos starts tiny and grows with the steps, so the curve is a choice:
  "exponential" is geometric from start to end (a constant factor per step: as many steps in each decade,
  where a straight line would spend almost all of them near `end`), "linear" a straight line, "constant"
  `end` from step 0 (`start` unused).
  """
  if kind not in SCHEDULE_KINDS:
    raise ValueError(
        f"Unknown eos weight schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}."
    )
  if kind == "constant":
    return optax.constant_schedule(end)
  if not 0 < start <= end or warmup_steps < 1:
    raise ValueError(
        f"The eos weight schedule needs 0 < start <= end and warmup_steps >= 1; got "
        f"start={start}, end={end}, warmup_steps={warmup_steps}."
    )
  if kind == "linear":
    return optax.linear_schedule(start, end, warmup_steps)
  # With a decay rate above 1, optax's end_value is an upper bound: the curve stops at `end`.
  return optax.exponential_decay(start, warmup_steps, decay_rate=end / start, end_value=end)


def discriminator_loss(
    real_logits: jax.Array, fake_logits: jax.Array, kind: str = "hinge"
) -> jax.Array:
  """[B, h, w, 1] patch logits on real and reconstructed images -> [] (taming-transformers' d-losses:
  half the sum of the real and fake terms, each a mean over images and patches)."""
  real_logits, fake_logits = real_logits.astype(jnp.float32), fake_logits.astype(jnp.float32)
  if kind == "hinge":
    real, fake = jax.nn.relu(1.0 - real_logits), jax.nn.relu(1.0 + fake_logits)
  elif kind == "non_saturating":
    real, fake = jax.nn.softplus(-real_logits), jax.nn.softplus(
        fake_logits
    )  # -log D(x), -log(1 - D(G))
  else:
    raise ValueError(f"Unknown GAN loss kind {kind!r}; expected one of {GAN_KINDS}.")
  return 0.5 * (jnp.mean(real) + jnp.mean(fake))


def generator_gan_loss(fake_logits: jax.Array, kind: str = "hinge") -> jax.Array:
  """[B, h, w, 1] patch logits on reconstructions -> [B]: the reconstruction's GAN loss, mean over patches.
  "hinge": -D(G); "non_saturating": -log sigmoid(D(G))."""
  fake_logits = fake_logits.astype(jnp.float32)
  if kind == "hinge":
    per_patch = -fake_logits
  elif kind == "non_saturating":
    per_patch = jax.nn.softplus(-fake_logits)
  else:
    raise ValueError(f"Unknown GAN loss kind {kind!r}; expected one of {GAN_KINDS}.")
  return jnp.mean(per_patch, axis=tuple(range(1, per_patch.ndim)))


def gan_active(step: jax.Array | int, start_step: jax.Array | int) -> jax.Array:
  """[] float32 1.0 from `start_step` on, 0.0 before: taming's adopt_weight as a traced select, so the GAN
  terms (multiplied by it) switch on inside the compiled step, with no Python branch and no recompile.
  """
  return jnp.where(jnp.asarray(step) >= start_step, 1.0, 0.0).astype(jnp.float32)


def mean_over_boxes(per_box: jax.Array, box_mask: jax.Array) -> jax.Array:
  """[B, K] per-box losses -> [B]: their mean over each image's valid boxes (0 where it has none)."""
  weights = box_mask.astype(jnp.float32)
  return jnp.sum(per_box * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def outside_mse(x: jax.Array, y: jax.Array, inside: jax.Array) -> jax.Array:
  """[B, H, W, C] x2 and [B, H, W] bool -> [B]: MSE over the pixels outside `inside` (0 where none is).

  Q-DOVE's irrelevant-region term; the paper weights it by lambda_o = 1e-10, so the image outside the
  query's boxes is kept only as far as it costs the relevant region nothing.
  """
  outside = (~inside).astype(jnp.float32)[..., None]  # [B, H, W, 1]
  squared = jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)) * outside
  count = jnp.sum(outside, axis=(1, 2, 3)) * x.shape[-1]
  return jnp.sum(squared, axis=(1, 2, 3)) / jnp.maximum(count, 1.0)
