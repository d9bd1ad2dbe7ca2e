"""The train state: everything a resumed run needs, as one pytree (saved whole by Orbax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dove_jax import losses
from dove_jax.tensor_io import param_path


@struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: nnx.State  # DOVE parameters
  opt_state: optax.OptState
  disc_params: nnx.State  # patch discriminator parameters
  disc_opt_state: optax.OptState
  eos_threshold: dict  # ring buffer of the last batches' mean L_rec (losses.threshold_buffer)
  rng: jax.Array  # [2] uint32: raw key data, so a checkpoint holds plain integers
  # Q-DOVE with query.threshold = "region": the same buffer for the L_rec that images without their query
  # reach on its boxes (None otherwise).
  region_threshold: dict | None = None


def optimizer(
    learning_rate: optax.Schedule,
    *,
    b1: float,
    b2: float,
    weight_decay: float,
    grad_clip: float,
    frozen: tuple[str, ...] = (),
    sgd: dict[str, float] | None = None,
    params=None,
) -> optax.GradientTransformation:
  """Clipped AdamW. Parameters under a `frozen` path prefix get no update at all (and no moments); those
  under a prefix in `sgd` (prefix -> learning rate) get plain SGD instead.

  SGD is for parts that one down-weighted loss alone reaches, such as the EOS head (only L_eos, scaled by a
  tiny lambda_eos, trains it): Adam divides every gradient by its own running scale, so their steps would not
  depend on that weight at all, and the lengths would swing at the full learning rate from the first step.
  """
  tx = optax.chain(
      optax.clip_by_global_norm(grad_clip),
      optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay),
  )
  sgd = {prefix: lr for prefix, lr in (sgd or {}).items() if lr > 0}
  if not frozen and not sgd:
    return tx

  def label(path, _):
    name = param_path(path)
    if name.startswith(tuple(frozen)):
      return "frozen"
    return next((prefix for prefix in sgd if name.startswith(prefix)), "adamw")

  transforms = {
      "adamw": tx,
      "frozen": optax.set_to_zero(),
      **{prefix: optax.sgd(lr) for prefix, lr in sgd.items()},
  }
  return optax.multi_transform(transforms, jax.tree_util.tree_map_with_path(label, params))


def learning_rate_schedule(
    peak: float, warmup_steps: int, total_steps: int, final_fraction: float = 0.0
) -> optax.Schedule:
  """Linear warmup to `peak`, then cosine decay to `final_fraction * peak` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1), end_value=final_fraction * peak
  )


def create_state(
    params,
    disc_params,
    tx,
    disc_tx,
    *,
    threshold_window: int,
    seed: int,
    region_threshold: bool = False,
) -> TrainState:
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      disc_params=disc_params,
      disc_opt_state=disc_tx.init(disc_params),
      eos_threshold=losses.threshold_buffer(threshold_window),
      rng=jax.random.key_data(jax.random.key(seed)),
      region_threshold=losses.threshold_buffer(threshold_window) if region_threshold else None,
  )
