"""Q-DOVE: query boxes (masks, crops, checks), the query as the generator's prefix (empty and padded queries),
the query loss, the query input step, loading a DOVE into a Q-DOVE, and the command line end to end.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dove_jax import boxes, losses
from dove_jax.data import pipeline, queries
from dove_jax.models.dove import DOVE
from dove_jax.text import ByteTokenizer
from test_console import tensorboard_tags
from test_dove import TINY, images
from test_training import python

ROOT = Path(__file__).resolve().parents[1]


# -- boxes ------------------------------------------------------------------------------------------------


def test_pixel_masks_take_pixel_centres_and_meeting_boxes_share_no_pixel():
  left, right = jnp.array([0.0, 0.0, 1.0, 0.5]), jnp.array([0.0, 0.5, 1.0, 1.0])  # meet at x = 0.5
  masks = np.asarray(boxes.pixel_masks(jnp.stack([left, right]), 4, 4))  # [2, 4, 4]
  np.testing.assert_array_equal(masks[0], np.tile([True, True, False, False], (4, 1)))
  assert not np.any(masks[0] & masks[1]) and np.all(masks[0] | masks[1])
  # Edges: a box covering less than half of a pixel leaves it out; one past its centre takes it.
  np.testing.assert_array_equal(
      boxes.pixel_masks(jnp.array([0.0, 0.0, 0.12, 0.13]), 4, 4)[0], [0, 0, 0, 0]
  )
  np.testing.assert_array_equal(
      boxes.pixel_masks(jnp.array([0.0, 0.0, 0.13, 0.13]), 4, 4)[0], [1, 0, 0, 0]
  )
  np.testing.assert_array_equal(
      boxes.pixel_masks(jnp.array(boxes.WHOLE_IMAGE), 3, 5), np.ones((3, 5), bool)
  )


def test_union_mask_of_overlapping_boxes_ignores_padding_boxes():
  region = jnp.array(
      [[[0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75], [0.0, 0.0, 1.0, 1.0]]]
  )  # [1, 3, 4]
  union = np.asarray(boxes.union_mask(region, jnp.array([[True, True, False]]), 8, 8))[0]
  expected = np.zeros((8, 8), bool)
  expected[:4, :4] = expected[2:6, 2:6] = True
  np.testing.assert_array_equal(union, expected)
  assert union.sum() == 16 + 16 - 4  # the overlap counted once


def test_crop_and_resize_copies_an_aligned_box_and_averages_a_larger_one():
  image = jax.random.uniform(jax.random.key(0), (1, 8, 8, 3))
  region = jnp.array([[[0.25, 0.5, 0.75, 1.0], [0.0, 0.0, 1.0, 1.0]]])
  crops = boxes.crop_and_resize(image, region, 4)  # [1, 2, 4, 4, 3]
  assert crops.shape == (1, 2, 4, 4, 3)
  np.testing.assert_allclose(crops[0, 0], image[0, 2:6, 4:8], atol=1e-6)  # same size: a plain copy
  # The whole 8 x 8 image into 4 x 4: what an antialiased bilinear resize of the image gives.
  np.testing.assert_allclose(
      crops[0, 1], jax.image.resize(image[0], (4, 4, 3), "linear"), atol=1e-6
  )
  # Differentiable in the image, under jit.
  grad = jax.jit(jax.grad(lambda x: boxes.crop_and_resize(x, region, 4)[0, 0].sum()))(image)
  np.testing.assert_allclose(grad[0, 2:6, 4:8], 1.0, atol=1e-6)
  assert float(jnp.abs(grad).sum()) == pytest.approx(48.0)


@pytest.mark.parametrize(
    "box, problem",
    [
        ([-0.1, 0.0, 0.5, 0.5], "outside the image"),
        ([0.0, 0.0, 0.5, 1.2], "outside the image"),
        ([0.5, 0.0, 0.5, 1.0], "is empty"),
        ([0.0, 0.7, 1.0, 0.2], "is empty"),
        ([0.0, np.nan, 1.0, 1.0], "not finite"),
    ],
)
def test_bad_boxes_are_rejected_naming_the_record_and_box(box, problem):
  with pytest.raises(
      ValueError, match=rf"^images/cat.jpg: box 1 \(ymin, xmin, ymax, xmax\) = .*{problem}"
  ):
    boxes.check_boxes([[0.0, 0.0, 1.0, 1.0], box], "images/cat.jpg")
  with pytest.raises(ValueError, match=r"shape \[num_boxes, 4\]"):
    boxes.check_boxes([0.0, 0.0, 1.0, 1.0], "images/cat.jpg")


def test_boxes_follow_the_crop_and_the_flip():
  region = np.array(
      [[0.5, 0.25, 1.0, 0.75], [0.0, 0.0, 0.1, 0.1]], np.float32
  )  # of a 100 x 200 image
  cropped = boxes.crop_boxes_np(region, 100, 200, top=20, left=60, size=80)
  np.testing.assert_allclose(
      cropped[0], [30 / 80, 0.0, 1.0, 90 / 80 * 0 + 1.0], atol=1e-6
  )  # clipped
  np.testing.assert_allclose(cropped[0], [0.375, 0.0, 1.0, 1.0], atol=1e-6)
  assert list(boxes.nonempty(cropped)) == [True, False]  # the second box is cut away entirely
  np.testing.assert_allclose(boxes.flip_boxes_np(region)[0], [0.5, 0.25, 1.0, 0.75])
  np.testing.assert_allclose(boxes.flip_boxes_np(region)[1], [0.0, 0.9, 0.1, 1.0])


def test_an_empty_query_or_no_valid_box_means_the_whole_image():
  region = jnp.array([[[0.1, 0.1, 0.4, 0.4], [0.5, 0.5, 0.9, 0.9]]] * 3)  # [3, 2, 4]
  box_mask = jnp.array([[True, True], [True, False], [False, False]])
  query_mask = jnp.array([[True, True], [False, False], [True, False]])
  chosen, chosen_mask = boxes.relevant_boxes(region, box_mask, query_mask)
  np.testing.assert_array_equal(chosen[0], region[0])  # a query with boxes keeps them
  np.testing.assert_array_equal(chosen_mask[0], [True, True])
  for row in (1, 2):  # the empty query, and a query with no valid box
    np.testing.assert_array_equal(chosen[row, 0], boxes.WHOLE_IMAGE)
    np.testing.assert_array_equal(chosen_mask[row], [True, False])


# -- the model --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qdove():
  return DOVE(**TINY, query_vocab_size=ByteTokenizer.vocab_size, rngs=nnx.Rngs(0))


def test_an_all_padding_query_is_no_query(qdove):
  x = images()
  ids = jnp.array([[5, 9, 77, 3], [100, 2, 0, 0]])
  plain, empty = qdove(x), qdove(x, query=ids, query_mask=jnp.zeros((2, 4), bool))
  np.testing.assert_allclose(empty.tokens.tokens, plain.tokens.tokens, atol=1e-5)
  np.testing.assert_allclose(empty.tokens.eos_prob, plain.tokens.eos_prob, atol=1e-6)
  np.testing.assert_allclose(empty.reconstruction, plain.reconstruction, atol=1e-5)
  # A real query does change the tokens: the test above is not vacuous.
  queried = qdove.encode(x, query=ids, query_mask=ids > 0)
  assert float(jnp.abs(queried.tokens - plain.tokens.tokens).max()) > 1e-3


def test_query_padding_does_not_change_the_outputs(qdove):
  """The same query unpadded, padded at the end with two different fillers, and on a longer row."""
  x = images()
  text = jnp.array([[12, 40, 7], [3, 3, 90]])
  reference = qdove.encode(x, query=text)
  for filler in (0, 200):
    padded = jnp.concatenate([text, jnp.full((2, 5), filler)], axis=1)
    mask = jnp.arange(8)[None, :] < 3
    out = qdove.encode(x, query=padded, query_mask=jnp.broadcast_to(mask, (2, 8)))
    np.testing.assert_allclose(out.tokens, reference.tokens, atol=1e-5)
    np.testing.assert_allclose(out.eos_prob, reference.eos_prob, atol=1e-6)


def test_query_errors_name_the_problem(qdove):
  x = images()
  with pytest.raises(ValueError, match=r"token ids must lie in \[0, 257\).*got ids in \[0, 300\]"):
    qdove.encode(x, query=jnp.array([[1, 300], [2, 3]]))
  with pytest.raises(ValueError, match=r"query must be int token ids of shape \[2, Q\]"):
    qdove.encode(x, query=jnp.ones((2, 4)))
  with pytest.raises(ValueError, match=r"reads no query \(model.query_vocab_size = 0\)"):
    DOVE(**TINY, rngs=nnx.Rngs(0)).encode(x, query=jnp.ones((2, 3), jnp.int32))


def test_no_recompile_for_other_queries_and_lengths(qdove, count_compiles):
  graphdef, state = nnx.split(qdove)
  encode = jax.jit(lambda s, x, b, q, m: nnx.merge(graphdef, s).encode(x, b, q, m))
  x = images()
  encode(state, x, jnp.array([0, 0]), jnp.ones((2, 6), jnp.int32), jnp.ones((2, 6), bool))
  calls = [
      (
          np.array([budget, 0]),
          np.full((2, 6), ids, np.int32),
          np.arange(6)[None, :].repeat(2, 0) < length,
      )
      for budget, ids, length in ((3, 7, 1), (0, 50, 4), (16, 200, 0))
  ]  # made before counting
  with count_compiles() as counter:
    for budget, ids, mask in calls:
      jax.block_until_ready(encode(state, x, budget, ids, mask))
  assert counter.count == 0


# -- the loss ---------------------------------------------------------------------------------------------


def test_outside_mse_counts_only_pixels_outside():
  x, y = jnp.zeros((1, 4, 4, 3)), jnp.zeros((1, 4, 4, 3)).at[0, :2].set(
      2.0
  )  # error 4 in the top half
  top = jnp.zeros((1, 4, 4), bool).at[0, :2].set(True)
  assert float(losses.outside_mse(x, y, top)[0]) == 0.0
  assert float(losses.outside_mse(x, y, ~top)[0]) == pytest.approx(4.0)
  assert float(losses.outside_mse(x, y, jnp.ones((1, 4, 4), bool))[0]) == 0.0  # nothing outside
  np.testing.assert_allclose(
      losses.mean_over_boxes(jnp.array([[1.0, 3.0, 9.0]]), jnp.array([[1, 1, 0]], bool)), [2.0]
  )


def test_query_objective_of_the_whole_image_box_is_plain_l_rec():
  """An empty or dropped query's L_qry is DOVE's L_rec + lambda_o * 0; a kept box's L_rec is its crop's. The
  region figure is the box's L_rec whether the query was kept or dropped."""
  from ml_collections import ConfigDict
  from dove_jax.training.objectives import query_objective

  recon, target = jax.random.uniform(jax.random.key(1), (2, 3, 16, 16, 3), minval=-1, maxval=1)

  def rec_terms(a, b):
    mse = losses.mse_per_image(a, b)
    return dict(rec=mse, mse=mse)

  # Image 0 keeps its query, image 1 has none, image 2's was dropped.
  batch = {
      "boxes": jnp.array([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]] * 3),
      "box_mask": jnp.array([[True, False]] * 3),
      "query_mask": jnp.array([[True], [False], [True]]),
  }
  kept = jnp.array([True, False, False])

  def objective_at(crop_size):
    return query_objective(
        rec_terms,
        recon,
        target,
        batch,
        kept,
        ConfigDict(dict(crop_size=crop_size, outside_weight=0.5)),
    )

  whole = losses.mse_per_image(recon, target)
  quarter = losses.mse_per_image(recon[:, :8, :8], target[:, :8, :8])
  outside = losses.outside_mse(recon, target, jnp.zeros((3, 16, 16), bool).at[:, :8, :8].set(True))
  terms, objective, region_rec = objective_at(8)  # the box's size: its crop is its pixels
  np.testing.assert_allclose(terms["rec"], [quarter[0], whole[1], whole[2]], rtol=1e-5)
  np.testing.assert_allclose(terms["outside_mse"], [outside[0], 0.0, 0.0], rtol=1e-6)
  np.testing.assert_allclose(objective, terms["rec"] + 0.5 * terms["outside_mse"], rtol=1e-6)
  np.testing.assert_allclose(
      region_rec[jnp.array([0, 2])], quarter[jnp.array([0, 2])], rtol=1e-5
  )  # dropped too
  _, _, region_rec = objective_at(16)  # the image's size: the whole-image crop is the image itself
  np.testing.assert_allclose(
      region_rec[1], whole[1], rtol=1e-5
  )  # no query: the whole image is its region


def test_region_threshold_records_only_images_without_their_query():
  """query.threshold = "region": an image trained with its query records nothing, however large its loss;
  the images without theirs record their whole-image L_rec, and their boxes' L_rec where they have a query.
  """
  from dove_jax.training.objectives import threshold_records

  rec = jnp.array([1e6, 0.2, 0.4, 0.6, 1e6])  # [B]; images 0 and 4 keep their queries
  region_rec = jnp.array([1e6, 0.3, 0.5, 9.0, 1e6])
  own_length = jnp.array([1.0, 1.0, 1.0, 1.0, 0.0])
  query = dict(
      kept=jnp.array([True, False, False, False, True]),
      has_boxes=jnp.array([True, True, True, False, True]),
  )  # image 3 has no query of its own
  records = threshold_records(rec, own_length, query, region_rec)
  buffers = {
      name: losses.threshold_update(losses.threshold_buffer(4), *record)
      for name, record in records.items()
  }
  assert float(losses.threshold_value(buffers["eos_threshold"])) == pytest.approx(
      0.4
  )  # images 1, 2, 3
  assert float(losses.threshold_value(buffers["region_threshold"])) == pytest.approx(
      0.4
  )  # images 1, 2
  # "shared" (the paper): one threshold over every image at its own length, queried or not.
  shared = threshold_records(rec, own_length, query, None)
  assert set(shared) == {"eos_threshold"}
  np.testing.assert_array_equal(shared["eos_threshold"][1], own_length)


# -- the query input step ---------------------------------------------------------------------------------


def test_select_query_pads_and_keeps_every_box_of_the_chosen_text():
  step = queries.SelectQuery(ByteTokenizer(), max_length=6, max_boxes=3)
  example = {
      "image": np.zeros((8, 8, 3), np.uint8),
      "descriptions": ["a cat", "a dog", "a cat"],
      "boxes": np.array([[0, 0, 0.5, 0.5], [0.5, 0.5, 1, 1], [0.2, 0.2, 0.4, 0.4]], np.float32),
  }
  texts = set()
  for seed in range(20):
    out = step.random_map(example, np.random.default_rng(seed))
    text = ByteTokenizer().decode(out["query_ids"][out["query_mask"]])
    texts.add(text)
    expected = example["boxes"][[0, 2]] if text == "a cat" else example["boxes"][[1]]
    np.testing.assert_array_equal(out["boxes"][: len(expected)], expected)
    np.testing.assert_array_equal(out["box_mask"], np.arange(3) < len(expected))
    assert out["query_ids"].shape == (6,) and "descriptions" not in out
  assert texts == {"a cat", "a dog"}
  # No regions (an unreadable image, a padding slot) or regions cut away by the crop: the empty query.
  for empty in ({"image": example["image"]}, {**example, "boxes": np.zeros((3, 4), np.float32)}):
    out = step.random_map(empty, np.random.default_rng(0))
    assert not out["query_mask"].any() and not out["box_mask"].any()


def test_region_errors_name_the_record():
  record = {"image": np.zeros((4, 4, 3), np.uint8), "path": "vg/1.jpg"}
  with pytest.raises(ValueError, match=r"vg/1.jpg: description 1 is empty"):
    pipeline.decode_image(
        {**record, "descriptions": ["a cat", "  "], "boxes": np.ones((2, 4)) * [0, 0, 1, 1]},
        with_regions=True,
    )
  with pytest.raises(ValueError, match=r"vg/1.jpg: 1 descriptions but 2 boxes"):
    pipeline.decode_image(
        {**record, "descriptions": ["a"], "boxes": np.ones((2, 4)) * [0, 0, 1, 1]},
        with_regions=True,
    )
  with pytest.raises(ValueError, match=r"vg/1.jpg: box 0 .* outside the image"):
    pipeline.decode_image(
        {**record, "descriptions": ["a"], "boxes": [[0, 0, 1, 2]]}, with_regions=True
    )


def test_query_batches_boxes_mark_the_described_object():
  """Through the whole pipeline (resize, random crop, flip): the pixels inside each example's box are mostly
  the object's colour, which differs from the rest of the image."""
  records = []
  rng = np.random.default_rng(0)
  for index in range(16):
    image = np.zeros((48, 64, 3), np.uint8)
    top, left = rng.integers(0, 32), rng.integers(0, 48)
    image[top : top + 16, left : left + 16] = (255, 0, 0)
    records.append(
        {
            "image": image,
            "descriptions": [b"the red square"],
            "path": f"r{index}",
            "boxes": np.array(
                [[top / 48, left / 64, (top + 16) / 48, (left + 16) / 64]], np.float32
            ),
        }
    )
  step = queries.SelectQuery(ByteTokenizer(), max_length=20, max_boxes=2)
  for train in (True, False):
    batch = next(
        iter(
            pipeline.make_dataset(
                records, image_size=32, global_batch_size=16, seed=0, train=train, query=step
            )
        )
    )
    assert batch["query_ids"].shape == (16, 20) and batch["boxes"].shape == (16, 2, 4)
    masks = np.asarray(
        boxes.union_mask(jnp.asarray(batch["boxes"]), jnp.asarray(batch["box_mask"]), 32, 32)
    )
    red = batch["image"][..., 0] > 0  # halfway between black and red
    for mask, is_red, kept in zip(masks, red, batch["query_mask"].any(1)):
      if kept:  # (the crop can cut the square away, which empties the query)
        assert is_red[mask].mean() > 0.8 and (~is_red[~mask]).mean() > 0.95


# -- weights and the command line -------------------------------------------------------------------------


def test_a_dove_weights_file_loads_into_a_qdove_keeping_its_query_embedding(tmp_path):
  from dove_jax.tensor_io import ConversionError
  from dove_jax.weights import load_weights, save_weights

  save_weights(DOVE(**TINY, rngs=nnx.Rngs(1)), tmp_path / "dove.safetensors")
  model = DOVE(**TINY, query_vocab_size=257, rngs=nnx.Rngs(2))
  embedding = np.asarray(model.query_embed.embedding[...])
  with pytest.raises(ConversionError, match=r"lacks query_embed/embedding \(needed by the model\)"):
    load_weights(model, tmp_path / "dove.safetensors")
  load_weights(model, tmp_path / "dove.safetensors", optional=("query_embed",))
  np.testing.assert_array_equal(model.query_embed.embedding[...], embedding)
  np.testing.assert_array_equal(
      model.generator.eos_head.bias[...],
      DOVE(**TINY, rngs=nnx.Rngs(1)).generator.eos_head.bias[...],
  )


def test_query_config_errors_fail_before_any_compute(tmp_path):
  result = python(
      [
          "train.py",
          "--config",
          "configs/qdove.py:tiny",
          f"--workdir={tmp_path}",
          "--config.query.tokenizer=gpt-neox",
      ]
  )
  assert result.returncode != 0 and "query.tokenizer_path" in result.stderr, result.stderr[-2000:]
  result = python(
      [
          "train.py",
          "--config",
          "configs/qdove.py:tiny",
          f"--workdir={tmp_path}",
          "--config.model.query_vocab_size=100",
      ]
  )
  assert (
      "config.model.query_vocab_size = 100 is smaller than the 'bytes' tokenizer's vocabulary (257"
      in result.stderr
  ), result.stderr[-2000:]


def test_three_step_tiny_qdove_run_and_its_evaluation(tmp_path, builtin_data_dir):
  data_dir = builtin_data_dir
  run = tmp_path / "run"
  train = [
      "train.py",
      "--config",
      "configs/qdove.py:tiny",
      f"--workdir={run}",
      "--config.train.log_every=1",
      f"--config.data.data_dir={data_dir}",
      "--config.data.global_batch_size=8",
      "--config.train.eval_batches=1",
      "--config.loss.lpips_weight=0",
  ]
  result = python(train + ["--config.train.num_steps=3"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert (run / "checkpoints" / "3").is_dir()
  recorded = tensorboard_tags(run)
  for name in (
      "train/rec",
      "train/outside_mse",
      "train/query_kept",
      "train/eos",
      "train/region_threshold",
      "eval/length_mean_no_query",
      "eval/mse_in_boxes",
      "eval/mse_outside_boxes",
  ):
    assert name in recorded, f"{name} not in TensorBoard"
  result = python(train + ["--config.train.num_steps=4"])  # resumes with both threshold buffers
  assert result.returncode == 0 and "resuming from step 3" in result.stderr, result.stderr[-3000:]

  result = python(
      [
          "eval.py",
          f"--workdir={run}",
          "--max_batches=2",
          "--probe_per_class=2",
          f"--config.data.data_dir={data_dir}",
      ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "query: mean length" in result.stdout, result.stdout
  results = json.loads((run / "eval" / "metrics.json").read_text())
  query = results["query"]
  assert (
      1 <= query["mean_length_with_query"] <= 64 and 1 <= query["mean_length_without_query"] <= 64
  )
  assert query["compression"] == pytest.approx(
      1 - query["mean_length_with_query"] / query["mean_length_without_query"]
  )
  for name in (
      "psnr_in_boxes_with_query",
      "psnr_outside_boxes_with_query",
      "psnr_in_boxes_without_query",
  ):
    assert 0 < query[name] < 60, (name, query)
  # The same boxes are measured with and without the query; outside them, only images that have pixels there.
  assert (
      query["images_with_outside_pixels_with_query"]
      == query["images_with_outside_pixels_without_query"]
      > 0
  )
  assert set(results["reconstruction"]) == {"predicted", "no_query", "16", "32", "64"}
  assert (run / "eval" / "queries.png").stat().st_size > 10_000


def test_pythia_initialises_the_query_embedding(tmp_path):
  """With a Pythia folder, the query tokens are embedded exactly as Pythia embeds them (its embed_in)."""
  import torch
  from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
  from dove_jax.convert.pretrained import load_pretrained

  torch.manual_seed(0)
  config = GPTNeoXConfig(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=2,
      intermediate_size=64,
      vocab_size=300,
      max_position_embeddings=64,
  )
  lm = GPTNeoXForCausalLM(config).eval()
  lm.save_pretrained(tmp_path)
  model = DOVE(**TINY, query_vocab_size=300, rngs=nnx.Rngs(0))
  reports = load_pretrained(model, pythia=tmp_path)
  assert reports[-1].converted == 1 and "embed_in" in reports[-1].origin
  ids = np.array([[5, 299, 0, 17]])
  with torch.no_grad():
    expected = lm.gpt_neox.embed_in(torch.as_tensor(ids)).numpy()
  np.testing.assert_array_equal(model.query_embed(jnp.asarray(ids)), expected)
