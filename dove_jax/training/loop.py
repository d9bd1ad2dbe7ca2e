"""`train_and_evaluate(config, workdir)`: the whole training run, top to bottom.

Sections: config check, devices, data, model, state and checkpoint, step, loop. Re-running the same command
resumes from the latest checkpoint in `workdir` (parameters, both optimizers, the EOS threshold buffer,
the step, the RNG and the input iterator's position).
"""

from __future__ import annotations

import functools
import itertools
import signal
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dove_jax import distributed, losses, mesh as meshlib, xla
from dove_jax.builders import data_sources, query_step, query_tokenizer
from dove_jax.data import pipeline
from dove_jax.data.prefetch import DevicePrefetcher
from dove_jax.evaluation import metrics as metrics_lib
from dove_jax.evaluation.functions import make_functions, measured_outside_mse, model_inputs
from dove_jax.models import kernels, remat
from dove_jax.training import checkpoint
from dove_jax.training.setup import build_training

DATA_SOURCES = ("builtin", "tfds", "folder", "visual_genome")
OBJECTIVES = ("dove", "vqgan")  # what the train step optimises: DOVE, or its VQ-GAN alone (stage 1)
QUERY_THRESHOLDS = ("shared", "region")  # Q-DOVE's EOS threshold (dove_jax.training.objectives)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Values a typo could break, checked before any compute (unknown keys already fail: the config is locked)."""
  choices = {
      "data.source": (config.data.source, DATA_SOURCES),
      "loss.gan_kind": (config.loss.gan_kind, losses.GAN_KINDS),
      "loss.eos_weight_kind": (config.loss.eos_weight_kind, losses.SCHEDULE_KINDS),
      "model.dtype": (config.model.dtype, ("", "float32", "bfloat16")),
      "model.kernels": (config.model.kernels, kernels.CHOICES),
      "model.remat": (config.model.remat, tuple(remat.POLICIES)),
      "train.objective": (config.train.objective, OBJECTIVES),
  }
  if "query" in config:
    choices["query.threshold"] = (config.query.threshold, QUERY_THRESHOLDS)
  for field, (value, allowed) in choices.items():
    if value not in allowed:
      raise ValueError(f"config.{field} = {value!r}; expected one of {allowed}")
  if config.data.global_batch_size % jax.device_count():
    raise ValueError(
        f"config.data.global_batch_size = {config.data.global_batch_size} is not a multiple of "
        f"the {jax.device_count()} devices"
    )
  if config.data.source in ("folder", "visual_genome") and not config.data.folder:
    raise ValueError(f"config.data.source = {config.data.source!r} needs config.data.folder")
  if config.data.prefetch < 0:
    raise ValueError(
        f"config.data.prefetch = {config.data.prefetch}; expected a number of batches >= 0"
    )
  if config.loss.random_length_power <= 0:
    raise ValueError(
        f"config.loss.random_length_power = {config.loss.random_length_power}; expected > 0 "
        "(1 = uniform lengths)"
    )
  check_init(config.init)
  if "query" in config:
    check_query_config(config)


def check_init(init: ml_collections.ConfigDict) -> None:
  """The paper's 146M VQ-GAN and both transformers start from pretrained weights: a run that names none
  would train them from random weights for days before anyone saw it, so that takes init.from_scratch.
  """
  if not (init.vqgan or init.pythia or init.weights or init.checkpoint or init.from_scratch):
    raise ValueError(
        "configs/dove.py trains from pretrained weights and config.init names none: set "
        "--config.init.vqgan=... and --config.init.pythia=... (or --config.init.weights / "
        "--config.init.checkpoint), or --config.init.from_scratch=True to train from random weights"
    )


def check_query_config(config: ml_collections.ConfigDict) -> None:
  """Q-DOVE's settings, the tokenizer file included (read here, before any compute)."""
  query = config.query
  if not 0 <= query.drop_rate <= 1:
    raise ValueError(f"config.query.drop_rate = {query.drop_rate}; expected a fraction in [0, 1]")
  for field in ("max_length", "max_boxes", "crop_size"):
    if query[field] < 1:
      raise ValueError(f"config.query.{field} = {query[field]}; expected a positive integer")
  vocab = query_tokenizer(config).vocab_size
  if vocab > config.model.query_vocab_size:
    raise ValueError(
        f"config.model.query_vocab_size = {config.model.query_vocab_size} is smaller than the "
        f"{config.query.tokenizer!r} tokenizer's vocabulary ({vocab} tokens)"
    )


def check_training_data(train_source, config: ml_collections.ConfigDict) -> None:
  """An empty training part fails naming the data and the field that emptied it."""
  if len(train_source) == 0:
    held_out = (
        f" (data.eval_fraction = {config.data.eval_fraction} holds out every image)"
        if config.data.source == "folder"
        else ""
    )
    raise ValueError(
        f"config.data: no image to train on in the {config.data.source!r} data{held_out}"
    )


class StopRequest:
  """SIGTERM sets a flag the loop reads between steps: save, then exit cleanly (no host sync to poll it)."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    logging.warning("SIGTERM: saving a checkpoint and stopping")
    self.requested = True


def log_first_compile(function, name: str):
  """`function`, logging how long its first call took to compile it, or to load it from the compilation
  cache (a jitted call returns once its program is built and dispatched)."""
  called = False

  def call(*args):
    nonlocal called
    if called:
      return function(*args)
    called = True
    with xla.CompileCounter() as compiled:
      start = time.perf_counter()
      out = function(*args)
    logging.info(
        "%s compiled in %.1f s (%d of %d programs from the compilation cache)",
        name,
        time.perf_counter() - start,
        compiled.cache_hits,
        compiled.count,
    )
    return out

  return call


LOSS_TERMS = ("loss", "rec", "mse", "lpips", "gan", "eos", "vq", "disc", "grad_norm", "outside_mse")


def check_finite(metrics: dict, step: int, last_good: int | None) -> None:
  """Stops the run at the first non-finite loss term, naming it (the EOS threshold is -inf by design
  until the first step is recorded, so only loss terms are checked)."""
  for name in LOSS_TERMS:
    value = metrics.get(name)
    if value is not None and not np.all(np.isfinite(value)):
      raise FloatingPointError(
          f"step {step}: loss term {name!r} is {value}; stopping. The last good checkpoint "
          f"is step {last_good} (checkpoints are only written while the loss is finite)"
      )


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
  """Rows of [N, H, W, 3] images in [-1, 1] -> one uint8 [N*H, cols*W, 3] picture (a row per image)."""
  columns = np.concatenate(rows, axis=2)  # [N, H, cols*W, 3]
  grid = columns.reshape(-1, *columns.shape[2:])
  return np.clip((grid + 1) * 127.5, 0, 255).astype(np.uint8)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains (or resumes) DOVE as `config` says, writing checkpoints and metrics under `workdir`.
  Returns the last logged metrics."""
  from clu import periodic_actions
  from dove_jax.training import progress

  workdir = Path(workdir)
  # ---------------------------------------------------------------------------- devices and config
  distributed.maybe_initialize_distributed()
  check_config(config)
  mesh = meshlib.make_mesh(config.mesh.data, config.mesh.fsdp)
  workdir.mkdir(parents=True, exist_ok=True)
  if config.train.compilation_cache:
    logging.debug(
        "compiled programs are cached in %s",
        xla.cache_compiled_programs(workdir / "compilation_cache"),
    )
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))

  # ---------------------------------------------------------------------------- data
  train_source, eval_source = data_sources(config)
  check_training_data(train_source, config)
  batch_size = config.data.global_batch_size
  steps_per_epoch = max(len(train_source) // batch_size, 1)
  num_steps = config.train.num_steps or config.train.num_epochs * steps_per_epoch
  writer = progress.create_writer(
      workdir, num_steps, batch_size, summaries=jax.process_index() == 0
  )
  # Yields (host batch, global batch on the mesh); its checkpointed state is the train step's position.
  train_iter = DevicePrefetcher(
      iter(
          pipeline.make_dataset(
              train_source,
              image_size=config.model.image_size,
              global_batch_size=batch_size,
              seed=config.seed,
              train=True,
              worker_count=config.data.worker_count,
              query=query_step(config),
          )
      ),
      functools.partial(meshlib.global_batch, mesh=mesh),
      config.data.prefetch,
  )

  # ---------------------------------------------------------------------------- model, state, step
  setup = build_training(config, mesh, num_steps)
  state = setup.state
  ckpt = checkpoint.Checkpointer(
      workdir / "checkpoints",
      every_steps=config.train.checkpoint_every,
      keep=config.train.keep_checkpoints,
  )
  if ckpt.latest_step() is not None:
    state = ckpt.restore(checkpoint.abstract_like(state, setup.shardings), train_iter)
    logging.info(
        "resuming from step %d", int(jax.device_get(state.step))
    )  # past any damaged newer one
  evaluator = Evaluator(config, setup.model_def, eval_source, mesh, setup.lpips)

  # ---------------------------------------------------------------------------- loop
  first_step = int(jax.device_get(state.step))
  train_step = log_first_compile(setup.train_step, "train step")
  report = periodic_actions.ReportProgress(num_train_steps=num_steps, writer=writer)
  stop = StopRequest()
  invalid_in_epoch = 0
  metrics = {}
  logging.info(
      "training steps %d..%d (%d per epoch), %d devices",
      first_step,
      num_steps,
      steps_per_epoch,
      jax.device_count(),
  )
  if first_step == 0:
    writer.write_scalars(0, evaluator.metrics(state.params))  # where the curves start
  for step in range(first_step + 1, num_steps + 1):
    batch, global_batch = next(train_iter)
    invalid_in_epoch += int(np.sum(~np.asarray(batch["valid"])))  # on the host already: no sync
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      state, step_metrics = train_step(state, global_batch, setup.lpips)
    report(step)
    last = step == num_steps or stop.requested
    if step % config.train.log_every == 0 or last:
      metrics = jax.device_get(step_metrics)
      check_finite(metrics, step, ckpt.latest_step())
      writer.write_scalars(step, {f"train/{k}": v for k, v in metrics.items()})
    if step % steps_per_epoch == 0:
      if invalid_in_epoch:
        logging.warning(
            "epoch %d: %d unreadable images skipped", step // steps_per_epoch, invalid_in_epoch
        )
      writer.write_scalars(step, {"data/skipped_images": invalid_in_epoch})
      invalid_in_epoch = 0
    if step % config.train.eval_every == 0 or last:
      writer.write_scalars(step, evaluator.metrics(state.params))
    if step % config.train.image_every == 0 or last:
      writer.write_images(step, {"reconstructions": evaluator.image_grid(state.params)[None]})
    if step % config.train.checkpoint_every == 0 or last or ckpt.reached_preemption(step):
      check_finite({"loss": jax.device_get(step_metrics["loss"])}, step, ckpt.latest_step())
      ckpt.save(step, state, train_iter, force=True)
    if stop.requested:
      break
  ckpt.close()
  writer.flush()
  return metrics


class Evaluator:
  """Validation figures during training: MSE (and SSIM, LPIPS) at the model's own lengths, PSNR at a few
  forced budgets, lengths against complexity, and a picture of inputs and reconstructions at a few budgets. For Q-DOVE also the lengths
  without the query and the MSE inside and outside the query's boxes. A stage-1 run (the VQ-GAN alone)
  shows its VQ-GAN's figures and reconstructions. The compiled functions are eval.py's."""

  def __init__(self, config, model_def: nnx.GraphDef, eval_source, mesh, lpips=None):
    self.max_tokens = config.model.max_tokens
    self.lpips = lpips
    self.mesh = mesh
    # Every process reads the same batches (whole, not its share), and each is split over every device
    # of every process: a figure is then one figure on all of them, the same in every process.
    dataset = pipeline.make_dataset(
        eval_source,
        image_size=config.model.image_size,
        global_batch_size=config.data.global_batch_size,
        seed=config.seed,
        train=False,
        shard_by_process=False,
        query=query_step(config),
    )
    # The same images every time, so the curves compare.
    self.host_batches = list(itertools.islice(dataset, config.train.eval_batches))
    self.batches = [
        meshlib.from_host(batch, meshlib.batch_sharding(mesh)) for batch in self.host_batches
    ]
    self.functions = make_functions(model_def)
    self.vqgan_only = config.train.objective == "vqgan"
    self.budgets = [
        self.max_tokens // 8,
        self.max_tokens // 4,
        self.max_tokens // 2,
        self.max_tokens,
    ]

  def _run(self, params, host_batch, batch, budget: int = 0, with_query: bool = True) -> dict:
    """The figures of `batch` (`host_batch` on the devices) at `budget`, still on the devices."""
    if self.vqgan_only:
      return self.functions.autoencode(params, self.lpips, batch)
    forced, query = meshlib.from_host(
        model_inputs(host_batch, budget, with_query), batch["image"].sharding
    )
    return self.functions.reconstruct(params, self.lpips, batch, forced, query)

  def metrics(self, params) -> dict:
    figures = {}
    for host_batch, batch in zip(self.host_batches, self.batches):
      out = self._run(params, host_batch, batch)
      if "query_ids" in batch:
        out["no_query_lengths"] = self._run(params, host_batch, batch, with_query=False)["lengths"]
      # The per-image figures only, back on the host (whole, in every process).
      out = meshlib.to_host(
          {name: v for name, v in out.items() if name not in ("reconstruction", "features")}
      )
      if "lengths" in out:
        out["complexity"] = host_batch["complexity"]
      keep = host_batch["valid"]
      for name, values in out.items():
        figures.setdefault(name, []).append(values[keep])
    figures = {name: np.concatenate(values) for name, values in figures.items()}
    results = {}
    if "lengths" in figures:
      lengths, complexity = figures.pop("lengths"), figures.pop("complexity")
      results = {"eval/length_mean": float(lengths.mean()), "eval/length_std": float(lengths.std())}
      spearman = metrics_lib.spearman(complexity, lengths)
      if (
          spearman is not None
      ):  # undefined while every length (or complexity) is the same: no point logged
        results["eval/length_complexity_spearman"] = spearman
    if "no_query_lengths" in figures:
      results["eval/length_mean_no_query"] = float(figures.pop("no_query_lengths").mean())
    if "has_outside_pixels" in figures:
      outside = measured_outside_mse(figures)
      del figures["has_outside_pixels"], figures["mse_outside_boxes"]
      if len(outside):
        figures["mse_outside_boxes"] = outside
    results.update({f"eval/{name}": float(values.mean()) for name, values in figures.items()})
    if not self.vqgan_only:  # the quality-versus-tokens curve, at a few forced budgets
      for budget in self.budgets:
        mse = np.concatenate(
            [
                meshlib.to_host(self._run(params, host_batch, batch, budget)["mse"])[
                    host_batch["valid"]
                ]
                for host_batch, batch in zip(self.host_batches, self.batches)
            ]
        )
        results[f"eval/psnr_at_{budget}_tokens"] = float(metrics_lib.psnr_from_mse(mse.mean()))
    return results

  def image_grid(self, params, count: int = 4) -> np.ndarray:
    host_batch = {name: value[:count] for name, value in self.host_batches[0].items()}
    batch = meshlib.from_host(
        host_batch, meshlib.replicated(self.mesh)
    )  # fewer images than devices
    budgets = [0] if self.vqgan_only else [0, *self.budgets]
    rows = [host_batch["image"]]
    rows += [
        meshlib.to_host(self._run(params, host_batch, batch, budget)["reconstruction"])
        for budget in budgets
    ]
    return image_grid(rows)
