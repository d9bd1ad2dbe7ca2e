"""The train step: one pure function of (state, batch) under jax.jit, with the state donated.

Per image: L_rec = mse_w * MSE + lpips_w * LPIPS + gan_w * GAN, L_eos from the dynamic threshold, and
L = rec_w * L_rec + lambda_eos(step) * L_eos, L_rec averaged over the valid images of the batch (a corrupt
input file arrives with valid=False and weight 0). A fraction of the images is reconstructed at a random
forced length so that every budget learns to reconstruct; the EOS loss, its average and the threshold only
see the images at their own length.

What is reconstructed and judged (the whole image for DOVE; the query's boxes for Q-DOVE) and the EOS
threshold each image is compared with come from the run's objective (`objectives.make_objective`), chosen
once.

Stage 1 (`train.objective = "vqgan"`, configs/vqgan.py) trains the VQ-GAN alone as an autoencoder: L_rec of
its reconstruction through the codebook plus the quantizer's loss; no tokens, no EOS.

Parameters under an `optim.freeze` prefix enter the loss as constants, so the backward pass skips them (a
frozen VQ-GAN encoder costs its forward pass only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dove_jax import losses
from dove_jax.models import eos
from dove_jax.tensor_io import param_path
from dove_jax.training.objectives import make_objective, weighted_mean
from dove_jax.training.state import TrainState


def batch_loss(
    objective: jax.Array,
    l_eos: jax.Array,
    valid: jax.Array,
    own_length: jax.Array,
    *,
    rec_weight: float,
    lambda_eos: jax.Array,
) -> jax.Array:
  """[B] x4 -> []: rec_weight * the mean objective over the valid images + lambda_eos * the mean L_eos over
  the images at their own length.

  Each term is a mean over the images it applies to: dividing L_eos by every valid image would scale lambda_eos
  by the own-length fraction (halve it at random_length_fraction = 0.5).
  """
  return rec_weight * weighted_mean(objective, valid) + lambda_eos * weighted_mean(
      l_eos, own_length
  )


def constants_under(params, prefixes: tuple[str, ...]):
  """`params` with every leaf under a path prefix in `prefixes` behind stop_gradient: no gradient flows into
  them, and none is computed through the layers that only they feed."""
  if not prefixes:
    return params
  return jax.tree_util.tree_map_with_path(
      lambda path, x: jax.lax.stop_gradient(x) if param_path(path).startswith(prefixes) else x,
      params,
  )


def length_metrics(lengths: jax.Array, valid: jax.Array, max_tokens: int) -> dict:
  """Mean, min and max of the valid images' lengths [B]."""
  lengths = lengths.astype(jnp.float32)
  return dict(
      length_mean=weighted_mean(lengths, valid),
      length_min=jnp.min(jnp.where(valid > 0, lengths, jnp.float32(max_tokens + 1))),
      length_max=jnp.max(jnp.where(valid > 0, lengths, 0.0)),
  )


def sample_budgets(
    rng: jax.Array, batch: int, max_tokens: int, fraction: float, power: float = 1.0
) -> jax.Array:
  """[B] int32: a random length in 1..n for about `fraction` of the images, 0 (= predicted) for the rest.

  P(length <= k) = (k / n) ** power: 1 is uniform; above 1 long lengths are likelier. Slot k is trained only
  by the images whose length reaches it, so under a uniform draw the last slots see a small share of them.
  """
  pick, draw = jax.random.split(rng)
  forced = jax.random.uniform(pick, (batch,)) < fraction
  length = jnp.clip(
      jnp.ceil(max_tokens * jax.random.uniform(draw, (batch,)) ** (1.0 / power)), 1, max_tokens
  )
  return jnp.where(forced, length, 0).astype(jnp.int32)


def own_length_weights(budget: jax.Array, valid: jax.Array) -> jax.Array:
  """[B] int32 budgets and [B] float32 validity -> [B] float32: 1 for the valid images reconstructed at their
  own (predicted) length, the only ones L_eos and the threshold may judge: a forced length is not the
  model's choice."""
  return (budget == 0).astype(jnp.float32) * valid


def make_train_step(
    config,
    model_def: nnx.GraphDef,
    disc_def: nnx.GraphDef,
    tx: optax.GradientTransformation,
    disc_tx: optax.GradientTransformation,
    learning_rate: optax.Schedule,
):
  """Returns train_step(state, batch, lpips) -> (state, metrics); `config` is the run's config.

  `lpips` is a `perceptual.LPIPS` (its weights travel as an argument, not as compiled-in constants), or
  None when the LPIPS weight is 0. What is judged comes from `objectives.make_objective(config)`.
  """
  loss_cfg = config.loss
  eos_weight = losses.eos_weight_schedule(
      start=loss_cfg.eos_weight_start,
      end=loss_cfg.eos_weight_end,
      warmup_steps=loss_cfg.eos_weight_steps,
      kind=loss_cfg.eos_weight_kind,
  )
  max_tokens, eos_threshold = config.model.max_tokens, config.model.eos_threshold
  objective = make_objective(config)
  frozen = tuple(config.optim.freeze)
  vqgan_only = config.train.objective == "vqgan"
  use_gan = loss_cfg.gan_weight > 0  # with weight 0 the discriminator neither judges nor trains

  def train_step(state: TrainState, batch: dict, lpips) -> tuple[TrainState, dict]:
    images = batch["image"]  # [B, H, W, 3] in [-1, 1]
    valid = batch["valid"].astype(jnp.float32)  # [B]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    budget = sample_budgets(
        rng,
        images.shape[0],
        max_tokens,
        loss_cfg.random_length_fraction,
        loss_cfg.random_length_power,
    )
    own_length = own_length_weights(budget, valid)  # [B]
    gan_on = losses.gan_active(state.step, loss_cfg.gan_start_step)
    discriminator = nnx.merge(disc_def, state.disc_params)
    inputs = objective.inputs(jax.random.fold_in(rng, 1), batch)  # {} for DOVE

    def rec_terms(recon, target):
      """L_rec and its parts per image: [N, h, w, 3] x2 -> dict of [N]."""
      mse = losses.mse_per_image(recon, target)
      perceptual = lpips(recon, target) if lpips is not None else jnp.zeros_like(mse)
      gan = (
          losses.generator_gan_loss(discriminator(recon), loss_cfg.gan_kind) * gan_on
          if use_gan
          else jnp.zeros_like(mse)
      )
      rec = losses.reconstruction_loss(
          mse,
          perceptual,
          gan,
          mse_weight=loss_cfg.mse_weight,
          lpips_weight=loss_cfg.lpips_weight,
          gan_weight=loss_cfg.gan_weight,
      )
      return dict(rec=rec, mse=mse, lpips=perceptual, gan=gan)

    def vqgan_loss_fn(params):
      """Stage 1: the VQ-GAN's reconstruction through its codebook; the threshold records nothing."""
      recon, vq = nnx.merge(model_def, constants_under(params, frozen)).vqgan(images)
      terms = rec_terms(recon, images)
      total = (
          loss_cfg.rec_weight * weighted_mean(terms["rec"], valid) + loss_cfg.vq_weight * vq.loss
      )
      logged = dict(
          loss=total,
          **{name: weighted_mean(value, valid) for name, value in terms.items()},
          vq=vq.loss,
          code_usage=vq.code_usage,
      )
      return total, (logged, recon, dict(eos_threshold=(terms["rec"], jnp.zeros_like(valid))))

    def loss_fn(params):
      model = nnx.merge(model_def, constants_under(params, frozen))
      out = model(images, budget, inputs.get("query"), inputs.get("query_mask"))
      recon = out.reconstruction
      judged = objective.judge(rec_terms, recon, batch, inputs, own_length, state)
      # The EOS loss and its threshold see L_rec of the relevant region only (the whole image for DOVE).
      l_eos = losses.eos_length_loss(
          out.tokens.eos_prob, out.tokens.lengths, judged.terms["rec"], judged.threshold
      )
      lambda_eos = eos_weight(state.step)
      total = batch_loss(
          judged.objective,
          l_eos,
          valid,
          own_length,
          rec_weight=loss_cfg.rec_weight,
          lambda_eos=lambda_eos,
      )
      vq_loss = out.vq.loss if out.vq is not None else jnp.zeros(())
      total = total + loss_cfg.vq_weight * vq_loss
      _, predicted = eos.eos_mask(
          out.tokens.eos_prob, None, eos_threshold
      )  # lengths without budgets
      logged = dict(
          loss=total,
          **{name: weighted_mean(value, valid) for name, value in judged.terms.items()},
          eos=weighted_mean(l_eos, own_length),
          vq=vq_loss,
          lambda_eos=lambda_eos,
          eos_threshold=losses.threshold_value(state.eos_threshold),
          **length_metrics(predicted, valid, max_tokens),
          **judged.logged,
      )
      return total, (logged, recon, judged.records)

    (_, (terms, recon, records)), grads = jax.value_and_grad(
        vqgan_loss_fn if vqgan_only else loss_fn, has_aux=True
    )(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    def disc_loss_fn(disc_params):
      disc = nnx.merge(disc_def, disc_params)
      # Real and reconstructed images in one pass (the discriminator normalises each image alone): half the
      # convolution calls of two passes, the same values.
      real, fake = jnp.split(disc(jnp.concatenate([images, jax.lax.stop_gradient(recon)])), 2)
      return losses.discriminator_loss(real, fake, loss_cfg.gan_kind) * gan_on

    disc_loss, disc_params, disc_opt_state = jnp.zeros(()), state.disc_params, state.disc_opt_state
    if use_gan:
      disc_loss, disc_grads = jax.value_and_grad(disc_loss_fn)(state.disc_params)
      disc_updates, disc_opt_state = disc_tx.update(
          disc_grads, state.disc_opt_state, state.disc_params
      )
      disc_params = optax.apply_updates(state.disc_params, disc_updates)

    metrics = dict(
        **terms,
        disc=disc_loss,
        grad_norm=optax.global_norm(grads),
        learning_rate=learning_rate(state.step),
    )
    buffers = {
        name: losses.threshold_update(getattr(state, name), *record)
        for name, record in records.items()
    }
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        disc_params=disc_params,
        disc_opt_state=disc_opt_state,
        **buffers,
    )
    return new_state, metrics

  return train_step
