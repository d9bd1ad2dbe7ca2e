"""VisualGenomeSource on a tiny fake Visual Genome tree: boxes, descriptions, skipped regions, errors.

The tree (built by `vg_root`), image id: size (width x height), folder, regions:
  1: 40x20 in VG_100K     11 good, 12 overhangs by 1 px (clipped), 13 blank phrase, 14 width 0
  2: 100x50 in VG_100K_2  21 good (the whole image), 22 overhangs by 2 px, 23 height -5
  3: no file              31 good
  4: 30x60 in images/     41 good
  5: 16x16 in VG_100K     51 starts right of the image: no usable region
  6: not an image         61 good (usable only when image_data.json gives its size)
"""

import io
import json
import logging
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dove_jax.data.visual_genome import SKIP_REASONS, VisualGenomeSource


def region(region_id: int, phrase: str, x: float, y: float, width: float, height: float) -> dict:
  return {
      "region_id": region_id,
      "image_id": region_id // 10,
      "phrase": phrase,
      "x": x,
      "y": y,
      "width": width,
      "height": height,
  }


REGIONS = {
    1: [
        region(11, "  the red square ", 10, 5, 20, 10),
        region(12, "sky", 30, -1, 11, 21),
        region(13, "   ", 0, 0, 5, 5),
        region(14, "a line", 0, 0, 0, 5),
    ],
    2: [
        region(21, "Ünïcödé 猫", 0, 0, 100, 50),
        region(22, "too wide", 90, 0, 12, 10),
        region(23, "upside down", 0, 10, 5, -5),
    ],
    3: [region(31, "a missing picture", 0, 0, 1, 1)],
    4: [region(41, "a cat", 3, 6, 3, 6)],
    5: [region(51, "off the edge", 20, 0, 2, 2)],
    6: [region(61, "a broken file", 0, 0, 5, 5)],
}


def write_tree(
    root: Path, regions: dict[int, list[dict]], image_data: list[dict] | None = None
) -> Path:
  (root / "region_descriptions.json").write_text(
      json.dumps(
          [
              {"id": image_id, "regions": image_regions}
              for image_id, image_regions in regions.items()
          ]
      )
  )
  if image_data is not None:
    (root / "image_data.json").write_text(json.dumps(image_data))
  return root


def write_image(path: Path, width: int, height: int) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (width, height), (200, 30, 30)).save(path)


@pytest.fixture
def vg_root(tmp_path) -> Path:
  write_image(tmp_path / "VG_100K" / "1.jpg", 40, 20)
  write_image(tmp_path / "VG_100K_2" / "2.jpg", 100, 50)
  write_image(tmp_path / "images" / "4.jpg", 30, 60)
  write_image(tmp_path / "VG_100K" / "5.jpg", 16, 16)
  (tmp_path / "VG_100K" / "6.jpg").write_bytes(b"not a jpeg")
  return write_tree(tmp_path, REGIONS)


def boxes(*rows) -> np.ndarray:
  return np.array(rows, np.float64).astype(np.float32)


def test_records_from_image_headers(vg_root):
  source = VisualGenomeSource(vg_root)
  assert len(source) == 3
  assert repr(source) == f"VisualGenomeSource(root={str(vg_root)!r}, images=3, regions=4)"
  assert source.skipped == {
      "empty_phrase": 1,
      "nonpositive_size": 2,
      "outside_image": 2,
      "missing_file": 1,
      "unreadable_file": 1,
      "no_usable_regions": 1,
  }
  assert list(source.skipped) == list(SKIP_REASONS)

  first = source[0]
  assert set(first) == {"image_bytes", "path", "label", "descriptions", "boxes"}
  assert first["path"] == str(vg_root / "VG_100K" / "1.jpg") and first["label"] == 0
  assert Image.open(io.BytesIO(first["image_bytes"])).size == (40, 20)
  assert first["descriptions"] == ["the red square", "sky"]
  assert first["boxes"].dtype == np.float32
  # (ymin, xmin, ymax, xmax) = (y / H, x / W, (y + h) / H, (x + w) / W) for W x H = 40 x 20;
  # region 12 (x 30..41, y -1..20) overhangs by 1 px and is clipped to x 30..40, y 0..20.
  np.testing.assert_array_equal(
      first["boxes"], boxes([5 / 20, 10 / 40, 15 / 20, 30 / 40], [0, 30 / 40, 1, 1])
  )

  second = source[1]
  assert second["path"] == str(vg_root / "VG_100K_2" / "2.jpg")
  assert second["descriptions"] == ["Ünïcödé 猫"]
  np.testing.assert_array_equal(second["boxes"], boxes([0, 0, 1, 1]))

  last = source[-1]  # the flat images/ folder; 30 x 60, box x 3..6, y 6..12
  assert last["path"] == str(vg_root / "images" / "4.jpg")
  assert last["descriptions"] == ["a cat"]
  np.testing.assert_array_equal(last["boxes"], boxes([6 / 60, 3 / 30, 12 / 60, 6 / 30]))
  with pytest.raises(IndexError):
    source[3]  # pylint: disable=pointless-statement


def test_sizes_from_image_data(vg_root):
  # Image 1 declared twice its file's size (only the JSON is read), 6 declared (its file is never opened),
  # 2 and 5 not listed (their headers are read); "id" and "image_id" both name the image.
  write_tree(
      vg_root,
      REGIONS,
      image_data=[
          {"image_id": 1, "width": 80, "height": 40, "url": "x"},
          {"id": 4, "width": 30, "height": 60},
          {"image_id": 6, "width": 10, "height": 10},
      ],
  )
  source = VisualGenomeSource(vg_root)
  assert [Path(source[i]["path"]).name for i in range(len(source))] == [
      "1.jpg",
      "2.jpg",
      "4.jpg",
      "6.jpg",
  ]
  np.testing.assert_array_equal(
      source[0]["boxes"], boxes([5 / 40, 10 / 80, 15 / 40, 30 / 80], [0, 30 / 80, 20 / 40, 41 / 80])
  )
  assert source.skipped["unreadable_file"] == 0 and source.skipped["missing_file"] == 1
  assert source[3]["image_bytes"] == b"not a jpeg"  # the decode step marks it invalid
  np.testing.assert_array_equal(source[3]["boxes"], boxes([0, 0, 0.5, 0.5]))


def test_file_gone_at_read_time_gives_empty_bytes(vg_root):
  source = VisualGenomeSource(vg_root)
  (vg_root / "VG_100K" / "1.jpg").unlink()
  record = source[0]
  assert record["image_bytes"] == b"" and record["descriptions"] == ["the red square", "sky"]


def test_limit_and_max_regions(vg_root):
  source = VisualGenomeSource(vg_root, max_regions_per_image=1, limit=2)
  assert len(source) == 2
  assert [source[0]["descriptions"], source[1]["descriptions"]] == [
      ["the red square"],
      ["Ünïcödé 猫"],
  ]
  assert source[0]["boxes"].shape == (1, 4)
  with pytest.raises(ValueError, match="limit must be at least 1 \\(or None for all\\), got 0"):
    VisualGenomeSource(vg_root, limit=0)


def test_image_dirs(vg_root):
  source = VisualGenomeSource(vg_root, image_dirs=[vg_root / "images"])
  assert [source[i]["path"] for i in range(len(source))] == [str(vg_root / "images" / "4.jpg")]
  with pytest.raises(FileNotFoundError, match="none of the image folders .*VG_100K_3 exists"):
    VisualGenomeSource(vg_root, image_dirs=["VG_100K_3"])


def test_skips_are_logged_once(vg_root, caplog):
  with caplog.at_level(logging.WARNING):
    VisualGenomeSource(vg_root)
  summaries = [r.getMessage() for r in caplog.records if "Visual Genome under" in r.getMessage()]
  assert summaries == [
      f"Visual Genome under {vg_root}: skipped 1 empty_phrase, 2 nonpositive_size, "
      "2 outside_image, 1 missing_file, 1 unreadable_file, 1 no_usable_regions"
  ]


@pytest.mark.parametrize(
    "bad, message",
    [
        (region(13, "   ", 0, 0, 5, 5), "image 1, region 13: phrase = '   ' is empty"),
        (region(14, "a line", 0, 0, 0, 5), "image 1, region 14: width = 0 is not positive"),
        (
            region(15, "too wide", 30, 0, 12, 5),
            "image 1, region 15: x + width = 42 is outside the image's "
            "[0, 40] by more than 1 pixel (40x20 image)",
        ),
        (
            region(16, "too high", 0, -1.5, 5, 5),
            "image 1, region 16: y = -1.5 is outside the image's [0, 20]",
        ),
    ],
)
def test_strict_names_image_region_field_and_value(tmp_path, bad, message):
  write_image(tmp_path / "VG_100K" / "1.jpg", 40, 20)
  write_tree(tmp_path, {1: [region(11, "fine", 0, 0, 40, 20), bad]})
  assert len(VisualGenomeSource(tmp_path)) == 1
  with pytest.raises(ValueError) as error:
    VisualGenomeSource(tmp_path, strict=True)
  assert str(error.value).startswith(f"Visual Genome {message}")


def test_strict_missing_image(tmp_path):
  write_image(tmp_path / "VG_100K" / "1.jpg", 40, 20)
  write_tree(tmp_path, {1: [region(11, "fine", 0, 0, 4, 4)], 3: [region(31, "gone", 0, 0, 1, 1)]})
  with pytest.raises(
      FileNotFoundError, match="Visual Genome image 3: no 3.jpg in the image folders"
  ):
    VisualGenomeSource(tmp_path, strict=True)


def test_missing_json_and_fields(tmp_path):
  with pytest.raises(FileNotFoundError) as error:
    VisualGenomeSource(tmp_path)
  assert str(tmp_path / "region_descriptions.json") in str(error.value)
  assert "nothing is downloaded" in str(error.value)
  write_image(tmp_path / "VG_100K" / "1.jpg", 40, 20)
  (tmp_path / "region_descriptions.json").write_text(
      json.dumps([{"id": 1, "regions": [{"region_id": 11, "phrase": "no box"}]}])
  )
  with pytest.raises(ValueError, match="image 1, region 11 has no field 'x'"):
    VisualGenomeSource(tmp_path)


def test_pickles_for_grain_workers(vg_root):
  source = VisualGenomeSource(vg_root)
  copy = pickle.loads(pickle.dumps(source))
  assert len(copy) == len(source) and copy[0]["descriptions"] == source[0]["descriptions"]
  np.testing.assert_array_equal(copy[0]["boxes"], source[0]["boxes"])


def test_records_become_query_batches(vg_root):
  """Through the Q-DOVE input pipeline: image 1 (40x20) centre-cropped to 16 px keeps columns 10..30 of the
  original, so 'the red square' (x 10..30, y 5..15) fills the crop's width and 'sky' (x 30..40) is cut away.
  """
  from dove_jax.data import pipeline
  from dove_jax.data.queries import SelectQuery
  from dove_jax.text import ByteTokenizer

  source = VisualGenomeSource(vg_root)
  step = SelectQuery(ByteTokenizer(), max_length=16, max_boxes=2)
  batch = next(
      iter(
          pipeline.make_dataset(
              source, image_size=16, global_batch_size=4, seed=0, train=False, query=step
          )
      )
  )
  assert ByteTokenizer().decode(batch["query_ids"][0][batch["query_mask"][0]]) == "the red square"
  np.testing.assert_allclose(batch["boxes"][0], [[0.25, 0.0, 0.75, 1.0], [0, 0, 0, 0]], atol=1e-6)
  np.testing.assert_array_equal(batch["box_mask"][0], [True, False])
  assert list(batch["valid"]) == [True, True, True, False]  # 3 images and one padding slot
  assert not batch["query_mask"][3].any()  # the padding slot has the empty query
