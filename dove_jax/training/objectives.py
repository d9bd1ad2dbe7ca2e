"""What the train step asks of a reconstruction, chosen once per run (`make_objective`).

- `WholeImage` (DOVE): L_rec of the whole image, and one EOS threshold: the mean L_rec of the recent images
  at their own length.
- `QueryRegion` (Q-DOVE, a config with a `query` section): half the queries are dropped (`drop_queries`; a
  dropped query's region is the whole image) and the reconstruction is judged by L_qry on the query's boxes,
  and barely outside them (`query_objective`). Its threshold (`query.threshold`) is either the paper's one
  mean over every image's relevant region ("shared"), or two ("region"): an image without its query is judged
  against the whole-image threshold, one with its query against the loss the images without theirs reach on
  their query's boxes. The second asks a query to stop once its boxes are as good as they would be without
  it: the tokens it saves are the compression.

An objective gives the train step the model's query arguments (`inputs`) and its judgement of the
reconstruction (`judge`): the per-image terms, the objective, the threshold each image's L_eos compares with,
and what each threshold buffer of the state records.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from dove_jax import boxes, losses

RecTerms = Callable[
    [jax.Array, jax.Array], dict
]  # (recon, target) [N, h, w, 3] x2 -> {L_rec part: [N]}


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class Judgement(NamedTuple):
  terms: dict  # the per-image parts [B] of L_rec of each image's relevant region (Q-DOVE: + outside_mse)
  objective: jax.Array  # [B] what the reconstruction is trained on
  threshold: jax.Array  # [] or [B]: what each image's L_eos compares its L_rec with
  records: (
      dict  # {threshold buffer (a TrainState field): (L_rec [B], weights [B])} recorded this step
  )
  logged: dict  # the objective's own figures, [] each


class WholeImage:
  """DOVE: no query; the whole image's L_rec against one threshold."""

  buffers = ("eos_threshold",)  # the threshold buffers of the TrainState it records into

  def inputs(self, rng: jax.Array, batch: dict) -> dict:
    """The model's query arguments, and what `judge` needs of them: none."""
    del rng, batch
    return {}

  def judge(
      self, rec_terms: RecTerms, recon: jax.Array, batch: dict, inputs: dict, own_length, state
  ) -> Judgement:
    del inputs
    terms = rec_terms(recon, batch["image"])
    threshold = losses.threshold_value(state.eos_threshold)
    records = threshold_records(terms["rec"], own_length, {}, None)
    return Judgement(terms, terms["rec"], threshold, records, {})


class QueryRegion:
  """Q-DOVE: L_qry on the query's boxes, against the "shared" or the "region" threshold."""

  def __init__(self, query_cfg):
    self.query_cfg = query_cfg
    self.region_threshold = query_cfg.threshold == "region"
    self.buffers = ("eos_threshold", "region_threshold")[: 1 + self.region_threshold]

  def inputs(self, rng: jax.Array, batch: dict) -> dict:
    """The query the model reads (half of them dropped) and which images keep theirs (`drop_queries`)."""
    return dict(query=batch["query_ids"], **drop_queries(rng, batch, self.query_cfg.drop_rate))

  def judge(
      self, rec_terms: RecTerms, recon: jax.Array, batch: dict, inputs: dict, own_length, state
  ) -> Judgement:
    terms, objective, region_rec = query_objective(
        rec_terms, recon, batch["image"], batch, inputs["kept"], self.query_cfg
    )
    threshold = losses.threshold_value(state.eos_threshold)  # [], the whole image's
    kept = inputs["kept"].astype(jnp.float32)
    logged = dict(query_kept=weighted_mean(kept, batch["valid"].astype(jnp.float32)))
    if not self.region_threshold:
      records = threshold_records(terms["rec"], own_length, inputs, None)
      return Judgement(terms, objective, threshold, records, logged)
    region = losses.threshold_value(state.region_threshold)
    records = threshold_records(terms["rec"], own_length, inputs, region_rec)
    image_threshold = jnp.where(inputs["kept"], region, threshold)  # [B]
    return Judgement(
        terms, objective, image_threshold, records, {**logged, "region_threshold": region}
    )


def make_objective(config) -> WholeImage | QueryRegion:
  """The run's objective: Q-DOVE's for a config with a `query` section, else DOVE's."""
  return QueryRegion(config.query) if "query" in config else WholeImage()


def threshold_records(
    rec: jax.Array, own_length: jax.Array, query: dict, region_rec: jax.Array | None
) -> dict:
  """What each threshold buffer records this step: {state field: (L_rec [B], weights [B])}.

  One threshold (DOVE, and Q-DOVE's "shared"): every image at its own length, judged on its relevant region.
  With `region_rec` (Q-DOVE's "region": [B] L_rec on the query's boxes), only the images at their own length
  without their query: their whole-image L_rec for the whole-image threshold, and, where they have a query
  with a box, what they reach on its boxes for the region threshold. An image with its query records neither,
  however well or badly it does: what it is compared with must not depend on it.
  """
  if region_rec is None:
    return dict(eos_threshold=(rec, own_length))
  without_query = own_length * ~query["kept"]
  return dict(
      eos_threshold=(rec, without_query),
      region_threshold=(region_rec, without_query * query["has_boxes"]),
  )


def drop_queries(rng: jax.Array, batch: dict, drop_rate: float) -> dict:
  """Empties each image's query with probability `drop_rate` (Q-DOVE trains half its images without one);
  an emptied query's relevant region becomes the whole image.

  -> {query_mask [B, Q]: the query the generator reads; kept [B] bool: the image trains with its query's
  boxes; has_boxes [B] bool: it has a query with a box, kept or not}.
  """
  drop = jax.random.uniform(rng, batch["query_mask"].shape[:1]) < drop_rate  # [B]
  query_mask = batch["query_mask"] & ~drop[:, None]  # [B, Q]
  return dict(
      query_mask=query_mask,
      kept=boxes.has_query_boxes(batch["box_mask"], query_mask),
      has_boxes=boxes.has_query_boxes(batch["box_mask"], batch["query_mask"]),
  )


def query_objective(
    rec_terms: RecTerms,
    recon: jax.Array,
    images: jax.Array,
    batch: dict,
    kept: jax.Array,
    query_cfg,
):
  """Q-DOVE's L_qry per image: L_rec on each box's crop (resampled to `crop_size`), averaged over the
  image's boxes, plus `outside_weight` (lambda_o) times the MSE outside every box; for an image whose query
  was dropped (`kept` [B] False), the whole image's L_rec.

  Returns (terms, objective, region_rec): the per-image parts of the relevant region's L_rec ([B] each) plus
  outside_mse; L_qry [B]; and [B] L_rec on the query's boxes whether the query was kept or not (what an image
  without its query reaches there: the "region" threshold).
  """
  b, height, width, _ = images.shape
  region, region_mask = boxes.relevant_boxes(batch["boxes"], batch["box_mask"], batch["query_mask"])
  k, size = region.shape[1], query_cfg.crop_size

  def crops(x):  # [B, H, W, 3] -> [B * K, size, size, 3]
    return boxes.crop_and_resize(x, region, size).reshape(b * k, size, size, x.shape[-1])

  per_box = rec_terms(crops(recon), crops(images))  # [B * K] each
  in_boxes = {
      name: losses.mean_over_boxes(value.reshape(b, k), region_mask)
      for name, value in per_box.items()
  }
  whole = rec_terms(recon, images)  # [B] each
  terms = {name: jnp.where(kept, in_boxes[name], whole[name]) for name in whole}
  inside = boxes.union_mask(region, region_mask, height, width) | ~kept[:, None, None]  # [B, H, W]
  terms["outside_mse"] = losses.outside_mse(recon, images, inside)
  return terms, terms["rec"] + query_cfg.outside_weight * terms["outside_mse"], in_boxes["rec"]
