"""Config -> the initial train state on a mesh and the compiled train step: no data, no workdir, no input
pipeline imported (the training loop, the benchmarks and the GPU check all build their step here).
"""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
from flax import nnx

from dove_jax import mesh as meshlib, xla
from dove_jax.builders import build_model
from dove_jax.models import kernels
from dove_jax.models.discriminator import PatchDiscriminator
from dove_jax.training import state as statelib
from dove_jax.training.objectives import make_objective
from dove_jax.training.step import make_train_step


@dataclasses.dataclass
class TrainingSetup:
  state: statelib.TrainState  # placed on the mesh
  shardings: object  # a NamedSharding per state array
  train_step: object  # jitted (state, global batch, lpips) -> (state, metrics), state donated
  model_def: nnx.GraphDef
  lpips: object  # perceptual.LPIPS on every device, or None when its loss weight is 0


def build_training(config: ml_collections.ConfigDict, mesh, num_steps: int) -> TrainingSetup:
  """The initial train state on `mesh` and the compiled step, from the config alone (no data, no workdir)."""
  from dove_jax.perceptual import load_lpips

  model_def, params = nnx.split(build_model(config))
  with kernels.use(config.model.kernels):  # its norms compute as the model's do
    disc_def, disc_params = nnx.split(
        PatchDiscriminator(
            base_channels=config.discriminator.base_channels,
            num_layers=config.discriminator.num_layers,
            rngs=nnx.Rngs(config.seed + 1),
        )
    )
  optim = config.optim
  learning_rate = statelib.learning_rate_schedule(
      optim.learning_rate, optim.warmup_steps, num_steps, optim.final_learning_rate
  )
  tx = statelib.optimizer(
      learning_rate,
      b1=optim.b1,
      b2=optim.b2,
      weight_decay=optim.weight_decay,
      grad_clip=optim.grad_clip,
      frozen=tuple(optim.freeze),
      sgd={"generator/eos_head": optim.eos_head_learning_rate},
      params=params,
  )
  disc_tx = statelib.optimizer(
      optim.disc_learning_rate, b1=0.5, b2=0.9, weight_decay=0.0, grad_clip=optim.grad_clip
  )
  state = statelib.create_state(
      params,
      disc_params,
      tx,
      disc_tx,
      threshold_window=config.loss.threshold_window,
      seed=config.seed,
      region_threshold="region_threshold" in make_objective(config).buffers,
  )
  shardings = meshlib.state_shardings(mesh, state)
  step = xla.jit(
      make_train_step(config, model_def, disc_def, tx, disc_tx, learning_rate),
      in_shardings=(shardings, meshlib.batch_sharding(mesh), None),
      out_shardings=(shardings, None),
      donate_argnums=0,
  )
  lpips = (
      jax.device_put(load_lpips(), meshlib.replicated(mesh)) if config.loss.lpips_weight else None
  )
  return TrainingSetup(jax.device_put(state, shardings), shardings, step, model_def, lpips)
