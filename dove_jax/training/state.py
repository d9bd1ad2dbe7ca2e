"""The train state: everything a resumed run needs, as one pytree (saved whole by Orbax)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from dove_jax import losses


@struct.dataclass
class TrainState:
  step: jax.Array  # [] int32
  params: nnx.State  # DOVE parameters
  opt_state: optax.OptState
  disc_params: nnx.State  # patch discriminator parameters
  disc_opt_state: optax.OptState
  eos_threshold: dict  # ring buffer of the last batches' mean L_rec (losses.threshold_buffer)
  rng: jax.Array  # [2] uint32: raw key data, so a checkpoint holds plain integers


def param_path(path) -> str:
  """A pytree path of an nnx.State leaf -> 'vqgan/encoder/conv_in/kernel'."""
  names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
  return "/".join(names[:-1] if names and names[-1] == "value" else names)


def optimizer(learning_rate: optax.Schedule, *, b1: float, b2: float, weight_decay: float,
              grad_clip: float, frozen: tuple[str, ...] = (), params=None) -> optax.GradientTransformation:
  """Clipped AdamW; parameters under a `frozen` path prefix get no update at all (and no moments)."""
  tx = optax.chain(optax.clip_by_global_norm(grad_clip),
                   optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))
  if not frozen:
    return tx
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "frozen" if param_path(path).startswith(tuple(frozen)) else "trained", params)
  return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warmup to `peak`, then cosine decay to zero at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1))


def create_state(params, disc_params, tx, disc_tx, *, threshold_window: int, seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    disc_params=disc_params, disc_opt_state=disc_tx.init(disc_params),
                    eos_threshold=losses.threshold_buffer(threshold_window),
                    rng=jax.random.key_data(jax.random.key(seed)))
