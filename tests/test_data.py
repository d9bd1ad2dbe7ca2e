"""The data part: the DoveShapes TFDS builder, the TFDS and image-folder sources, and the grain pipeline.

The builder is prepared with TFDS's own `max_examples_per_split` cap (a few hundred milliseconds instead of
the ~20 s of the full 64 px set); examples are drawn from per-index seeds, so the capped files hold
exactly the first examples of the full ones.
"""

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from dove_jax.data import builtin, pipeline, sources

CAP = 128  # examples per split in the tests' copies of dove_shapes/64
REPO = Path(__file__).resolve().parents[1]


def prepare_shapes(data_dir: Path) -> Path:
  builder = builtin.DoveShapes(config="64", data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          max_examples_per_split=CAP, try_download_gcs=False
      )
  )
  return data_dir


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory) -> Path:
  return prepare_shapes(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def shapes(shapes_dir):
  """(train, validation) data sources of the capped dove_shapes/64."""
  return builtin.load_builtin(64, str(shapes_dir))


def take(iterator, n: int) -> list[dict]:
  return [next(iterator) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


# ------------------------------------------------------------------------------------------------ builder


def test_builder_writes_identical_files_every_time(shapes_dir, tmp_path):
  again = prepare_shapes(tmp_path)
  version_dir = Path("dove_shapes", "64", "1.0.0")
  names = sorted(os.listdir(shapes_dir / version_dir))
  assert any("train.array_record" in name for name in names)
  assert names == sorted(os.listdir(again / version_dir))
  for name in names:
    assert (shapes_dir / version_dir / name).read_bytes() == (
        again / version_dir / name
    ).read_bytes(), name


def test_same_seed_same_example():
  first, second = builtin.generate_example(64, "train", 7), builtin.generate_example(64, "train", 7)
  for key in ("image", "boxes", "complexity", "label"):
    np.testing.assert_array_equal(first[key], second[key])
  assert first["descriptions"] == second["descriptions"]
  assert not np.array_equal(first["image"], builtin.generate_example(64, "validation", 7)["image"])


def test_files_hold_the_first_examples_of_each_split(shapes):
  for split, source in zip(("train", "validation"), shapes):
    stored = sorted(source[i]["image"].tobytes() for i in range(len(source)))
    generated = sorted(
        builtin.generate_example(64, split, i)["image"].tobytes() for i in range(CAP)
    )
    assert stored == generated, split


def test_fields_dtypes_and_ranges(shapes):
  train, _ = shapes
  for i in range(len(train)):
    example = train[i]
    assert example["image"].dtype == np.uint8 and example["image"].shape == (64, 64, 3)
    assert 0 <= example["label"] < len(builtin.LABELS)
    boxes = example["boxes"]
    assert boxes.dtype == np.float32 and boxes.shape == (len(example["descriptions"]), 4)
    assert np.all((boxes >= 0) & (boxes <= 1))
    assert np.all(boxes[:, 0] < boxes[:, 2]) and np.all(boxes[:, 1] < boxes[:, 3])
    for text in example["descriptions"]:
      words = text.decode().split()
      assert words[0] == "the" and words[1] in builtin.COLOURS and words[-1] in builtin.SHAPES
    if not len(boxes):
      assert builtin.LABELS[example["label"]] == "empty"
    assert np.float32(example["complexity"]) >= len(boxes)


def test_complexity_spans_empty_to_busy_and_grows_with_objects():
  examples = [builtin.generate_example(64, "train", i) for i in range(400)]
  counts = np.array([len(e["boxes"]) for e in examples])
  complexity = np.array([e["complexity"] for e in examples])
  assert (counts == 0).mean() > 0.1 and (counts >= 8).mean() > 0.1
  assert np.all(complexity[counts == 0] <= 0.5)  # an empty image scores only its gradient
  means = [complexity[(counts >= low) & (counts < low + 3)].mean() for low in range(0, 12, 3)]
  assert np.all(np.diff(means) > 0), means
  labels = np.array([e["label"] for e in examples])
  assert set(labels) == set(range(len(builtin.LABELS)))  # every class occurs


def test_reading_needs_no_tensorflow(shapes_dir, tmp_path):
  # Generation and reading in a fresh interpreter, so nothing imported by other tests can mask an import.
  script = textwrap.dedent(f"""
      import sys
      import tensorflow_datasets as tfds
      from dove_jax.data import builtin, pipeline, sources
      builder = builtin.DoveShapes(config="64", data_dir={str(tmp_path)!r}, file_format="array_record")
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(max_examples_per_split=4))
      assert "tensorflow" not in sys.modules, "generating imported tensorflow"
      train, _ = builtin.load_builtin(64, {str(shapes_dir)!r})
      train[0]
      source = sources.tfds_source("dove_shapes/64", "validation", {str(shapes_dir)!r})
      next(iter(pipeline.make_dataset(source, image_size=32, global_batch_size=4, seed=0, train=False)))
      assert "tensorflow" not in sys.modules, "reading imported tensorflow"
  """)
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ sources


def test_load_builtin_reuses_prepared_data(shapes_dir):
  train, validation = builtin.load_builtin(
      64, str(shapes_dir)
  )  # capped copy: regenerating would give 8192
  assert (len(train), len(validation)) == (CAP, CAP)


def test_tfds_source_reads_prepared_and_names_what_is_missing(shapes_dir, tmp_path):
  assert len(sources.tfds_source("dove_shapes/64", "validation", str(shapes_dir))) == CAP
  for name in ("imagenet2012", "no_such_data_set"):
    with pytest.raises(FileNotFoundError) as error:
      sources.tfds_source(name, "validation", str(tmp_path))
    assert all(part in str(error.value) for part in (name, "'validation'", str(tmp_path)))
  assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def encode(image: np.ndarray, fmt: str = "PNG", mode: str = "RGB") -> bytes:
  """uint8 [H, W, 3] -> file bytes, converted to the Pillow `mode` first (L, RGBA, P: palette)."""
  buffer = io.BytesIO()
  Image.fromarray(image).convert(mode).save(buffer, format=fmt)
  return buffer.getvalue()


@pytest.fixture
def image_folder(tmp_path) -> Path:
  """Two classes, nested folders, grayscale/RGBA/palette/webp/jpeg files, one corrupt file, one non-image."""
  rng = np.random.default_rng(0)
  rgb = lambda h, w: rng.integers(0, 256, (h, w, 3), np.uint8)
  files = {
      "cats/a.png": encode(rgb(40, 60)),
      "cats/nested/deeper/b.png": encode(rgb(50, 30), mode="L"),
      "cats/c.JPG": encode(rgb(32, 32), "JPEG"),
      "dogs/d.png": encode(rgb(36, 48), mode="RGBA"),
      "dogs/e.png": b"\x89PNG\r\n\x1a\n this is not really a png",  # corrupt
      "dogs/f.webp": encode(rgb(33, 47), "WEBP"),
      "dogs/g.png": encode(rgb(40, 40), mode="P"),
      "dogs/notes.txt": b"not an image",
  }
  for name, data in files.items():
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(data)
  return tmp_path


def test_image_folder_source(image_folder):
  source = sources.ImageFolderSource(image_folder)
  paths = [Path(source[i]["path"]).relative_to(image_folder).as_posix() for i in range(len(source))]
  assert paths == [
      "cats/a.png",
      "cats/c.JPG",
      "cats/nested/deeper/b.png",
      "dogs/d.png",
      "dogs/e.png",
      "dogs/f.webp",
      "dogs/g.png",
  ]
  assert source.classes == ["cats", "dogs"]
  assert [source[i]["label"] for i in range(len(source))] == [0, 0, 0, 1, 1, 1, 1]
  assert source[0]["image_bytes"] == (image_folder / "cats" / "a.png").read_bytes()


def test_image_folder_flat_empty_and_mixed(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no images"):
    sources.ImageFolderSource(tmp_path / "empty")
  flat = tmp_path / "flat"
  flat.mkdir()
  for name in ("b.png", "a.png"):
    (flat / name).write_bytes(encode(np.zeros((8, 8, 3), np.uint8)))
  source = sources.ImageFolderSource(flat)
  assert [Path(source[i]["path"]).name for i in range(2)] == ["a.png", "b.png"]
  assert [source[i]["label"] for i in range(2)] == [0, 0]
  (flat / "class").mkdir()
  (flat / "class" / "c.png").write_bytes(encode(np.zeros((8, 8, 3), np.uint8)))
  with pytest.raises(ValueError, match="directly inside"):
    sources.ImageFolderSource(flat)


def png_folder(root: Path, classes: int = 3, per_class: int = 40) -> Path:
  """`classes` class folders of `per_class` 8 x 8 PNGs each, every image a different flat colour."""
  for c in range(classes):
    (root / f"class{c}").mkdir(parents=True)
    for i in range(per_class):
      (root / f"class{c}" / f"{i:03d}.png").write_bytes(
          encode(np.full((8, 8, 3), (c, i, 7), np.uint8))
      )
  return root


def test_folder_split_is_disjoint_covers_the_folder_and_is_the_same_every_time(tmp_path):
  folder = png_folder(tmp_path)
  train, held = sources.folder_split(sources.ImageFolderSource(folder), 0.25)
  paths = lambda part: [part[i]["path"] for i in range(len(part))]
  train_paths, eval_paths = paths(train), paths(held)
  assert not set(train_paths) & set(eval_paths)
  assert sorted(train_paths + eval_paths) == sorted(str(p) for p in folder.rglob("*.png"))
  assert 15 <= len(eval_paths) <= 45  # about a quarter of 120
  again_train, again_eval = sources.folder_split(sources.ImageFolderSource(folder), 0.25)
  assert (paths(again_train), paths(again_eval)) == (train_paths, eval_paths)
  assert train.classes == held.classes == ["class0", "class1", "class2"]
  assert {held[i]["label"] for i in range(len(held))} == {0, 1, 2}
  # A larger fraction only adds images to the held-out part: the hash decides, not the folder's contents.
  _, more = sources.folder_split(sources.ImageFolderSource(folder), 0.5)
  assert set(eval_paths) < set(paths(more))


def test_folder_split_refuses_a_bad_fraction_and_an_empty_held_out_part(tmp_path):
  folder = sources.ImageFolderSource(png_folder(tmp_path, classes=1, per_class=3))
  for fraction in (0, 1.5):
    with pytest.raises(ValueError, match=r"eval_fraction = .*expected a fraction in \(0, 1\]"):
      sources.folder_split(folder, fraction)
  with pytest.raises(ValueError, match="falls in the held-out"):
    sources.folder_split(folder, 1e-9)
  train, held = sources.folder_split(folder, 1)  # a folder only evaluated
  assert (len(train), len(held)) == (0, 3)


def test_record_labels_reads_every_label_without_decoding_images(shapes):
  _, validation = shapes
  np.testing.assert_array_equal(
      sources.record_labels(validation), [validation[i]["label"] for i in range(len(validation))]
  )


def test_class_subset_selects_exactly_the_listed_classes_relabelled_in_list_order(shapes, tmp_path):
  _, validation = shapes
  listed = tmp_path / "classes.txt"
  listed.write_text(
      "# three of dove_shapes' classes\ncircle\n\nsquare  # by name\n7\n"
  )  # 7: hexagon, by id
  subset = sources.class_subset(validation, listed)
  assert subset.classes == ["circle", "square", "hexagon"]
  original = sources.record_labels(validation)  # [128]
  wanted = [builtin.LABELS.index(name) for name in subset.classes]
  np.testing.assert_array_equal(subset.indices, np.flatnonzero(np.isin(original, wanted)))
  assert 0 < len(subset) < len(validation)
  records = [subset[i] for i in range(len(subset))]
  np.testing.assert_array_equal(
      [r["label"] for r in records], [wanted.index(original[i]) for i in subset.indices]
  )
  np.testing.assert_array_equal(subset.labels(), [r["label"] for r in records])
  np.testing.assert_array_equal(records[0]["image"], validation[int(subset.indices[0])]["image"])


@pytest.mark.parametrize(
    "lines, message",
    [
        ("circle\nhexagonal\n", "unknown class 'hexagonal'"),
        ("10\n", "unknown class '10'"),
        ("circle\n3\n", "class '3' is listed twice"),
        ("# nothing\n", "lists no class"),
    ],
)
def test_class_subset_names_the_file_and_the_bad_entry(shapes, tmp_path, lines, message):
  _, validation = shapes
  listed = tmp_path / "classes.txt"
  listed.write_text(lines)
  with pytest.raises(ValueError) as error:
    sources.class_subset(validation, listed)
  assert str(error.value).startswith(f"{listed}: ") and message in str(error.value), error.value


def test_imagenet100_list_is_100_distinct_imagenet_classes():
  from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

  imagenet = Path(imagenet_common.label_names_file()).read_text().split()
  listed = sources.read_class_list(REPO / "configs" / "imagenet100.txt")
  assert len(listed) == len(set(listed)) == 100 and set(listed) <= set(imagenet)
  assert listed[:3] == ["n02869837", "n01749939", "n02488291"]  # CMC's order
  assert sources.class_ids(listed, imagenet, "imagenet100.txt") == [
      imagenet.index(c) for c in listed
  ]


# ------------------------------------------------------------------------------------------------ pipeline


def test_decode_image_converts_and_never_raises(caplog):
  gray = pipeline.decode_image(
      {"image": np.full((5, 7, 1), 9, np.uint8), "label": 3, "complexity": 2.5}
  )
  assert gray["image"].shape == (5, 7, 3) and gray["valid"] and gray["label"] == 3
  assert gray["complexity"] == np.float32(2.5)
  rgba_png = encode(np.zeros((4, 6, 3), np.uint8), mode="RGBA")
  rgba = pipeline.decode_image({"image_bytes": rgba_png, "label": 1})
  assert rgba["image"].shape == (4, 6, 3) and rgba["complexity"] == 0
  broken = pipeline.decode_image({"image_bytes": b"garbage", "path": "/data/x.jpg", "label": 2})
  assert not broken["valid"] and not broken["image"].any()
  assert "/data/x.jpg" in caplog.text


def test_folder_pipeline_marks_the_corrupt_file_and_counts_it_exactly(image_folder):
  source = sources.ImageFolderSource(image_folder)
  batches = list(
      pipeline.make_dataset(source, image_size=32, global_batch_size=4, seed=0, train=False)
  )
  valid = np.concatenate([b["valid"] for b in batches])  # 7 images, then one padding slot
  np.testing.assert_array_equal(valid, [True, True, True, True, False, True, True, False])
  assert all(b["image"].shape == (4, 32, 32, 3) for b in batches)
  np.testing.assert_array_equal(
      np.concatenate([b["label"] for b in batches]), [0, 0, 0, 1, 0, 1, 1, 0]
  )
  for workers in (0, 2):
    train = pipeline.make_dataset(
        source,
        image_size=32,
        global_batch_size=2,
        seed=0,
        train=True,
        num_epochs=2,
        worker_count=workers,
    )
    invalid = sum(int(np.sum(~b["valid"])) for b in train)  # 14 examples -> 7 batches, none dropped
    assert invalid == 2, workers


def test_batches_shapes_dtypes_and_range(shapes):
  train, _ = shapes
  batch = next(
      iter(pipeline.make_dataset(train, image_size=48, global_batch_size=8, seed=0, train=True))
  )
  assert batch["image"].shape == (8, 48, 48, 3) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and batch["label"].shape == (8,)
  assert batch["valid"].dtype == np.bool_ and batch["valid"].all()
  assert batch["complexity"].dtype == np.float32 and batch["complexity"].shape == (8,)
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].std() > 0.1


def test_training_order_is_set_by_the_seed(shapes):
  train, _ = shapes
  make = lambda seed: iter(
      pipeline.make_dataset(train, image_size=64, global_batch_size=8, seed=seed, train=True)
  )
  first = take(make(0), 3)
  assert_same_batches(first, take(make(0), 3))
  assert not np.array_equal(first[0]["image"], next(make(1))["image"])


def test_random_crop_and_flip_vary_per_example_and_epoch():
  wide = [
      {"image": np.tile(np.arange(64, dtype=np.uint8)[None, :, None], (32, 1, 3)), "label": 0}
  ] * 4
  images = [
      b["image"]
      for b in pipeline.make_dataset(
          wide, image_size=16, global_batch_size=4, seed=0, train=True, num_epochs=2
      )
  ]
  crops = np.concatenate(images)[:, 0, :, 0]  # [8, 16] first row of each crop
  assert len({row.tobytes() for row in crops}) > 2  # different offsets and flips for one image
  centre = next(
      iter(pipeline.make_dataset(wide, image_size=16, global_batch_size=4, seed=0, train=False))
  )
  assert len({row.tobytes() for row in centre["image"][:, 0, :, 0]}) == 1


def test_flip_mirrors_the_boxes_and_swaps_left_and_right_in_the_texts():
  image = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
  boxes = np.array([[0.0, 0.0, 0.5, 0.25], [0.5, 0.5, 1.0, 1.0]], np.float32)
  texts = ["the left dog", "Right of the leftover cake, LEFT", "a red square"]
  example = {"image": image, "boxes": boxes, "descriptions": texts}
  flipped = pipeline.flip(example)
  np.testing.assert_array_equal(flipped["image"], image[:, ::-1])
  np.testing.assert_allclose(flipped["boxes"], [[0.0, 0.75, 0.5, 1.0], [0.5, 0.0, 1.0, 0.5]])
  assert flipped["descriptions"] == [
      "the right dog",
      "Left of the leftover cake, RIGHT",
      "a red square",
  ]
  assert pipeline.flip(flipped)["descriptions"] == texts  # a second flip restores them
  assert (
      example["descriptions"] is texts and texts[0] == "the left dog"
  )  # the input is left as it was
  assert pipeline.mirror_text(b"left-hand side, right?") == b"right-hand side, left?"


def test_eval_covers_every_example_once_with_padding_marked(shapes):
  _, validation = shapes
  batches = list(
      pipeline.make_dataset(validation, image_size=64, global_batch_size=48, seed=0, train=False)
  )
  assert len(batches) == 3  # 128 examples -> 144 slots
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(valid, np.arange(144) < CAP)
  seen = np.concatenate([b["complexity"] for b in batches])[valid]
  np.testing.assert_array_equal(seen, [np.float32(validation[i]["complexity"]) for i in range(CAP)])
  padding = batches[-1]["image"][~batches[-1]["valid"]]
  assert np.all(padding == -1)  # a black zero image


def numbered_source(n: int) -> list[dict]:
  """Records whose label is their index, so a batch tells exactly which examples it holds."""
  return [{"image": np.full((8, 8, 3), i % 256, np.uint8), "label": i} for i in range(n)]


@pytest.mark.parametrize("train", [True, False])
def test_processes_share_the_data_without_overlap(monkeypatch, train):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  per_process = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    dataset = pipeline.make_dataset(
        numbered_source(100), image_size=8, global_batch_size=16, seed=0, train=train, num_epochs=1
    )
    per_process.append([np.asarray(b["label"])[b["valid"]] for b in dataset])
  assert len(per_process[0]) == len(per_process[1])  # the same number of steps on every host
  assert all(len(labels) == 8 for labels in per_process[0][:-1])
  seen = np.sort(np.concatenate([labels for batches in per_process for labels in batches]))
  if train:  # one epoch, remainder dropped: 96 of the 100, each once
    assert len(seen) == 96 and len(np.unique(seen)) == 96
  else:
    np.testing.assert_array_equal(seen, np.arange(100))


def test_iterator_state_round_trip(shapes):
  train, _ = shapes
  dataset = pipeline.make_dataset(train, image_size=32, global_batch_size=8, seed=0, train=True)
  iterator = iter(dataset)
  take(iterator, 3)
  state = iterator.get_state()
  expected = take(iterator, 2)
  restored = iter(dataset)
  restored.set_state(state)
  assert_same_batches(take(restored, 2), expected)


def test_iterator_state_round_trip_through_orbax_with_workers(shapes, tmp_path):
  train, _ = shapes
  make = lambda workers: iter(
      pipeline.make_dataset(
          train, image_size=32, global_batch_size=8, seed=0, train=True, worker_count=workers
      )
  )
  iterator = make(2)
  assert_same_batches(take(iterator, 3), take(make(0), 3))  # the same batches for any worker count
  manager = ocp.CheckpointManager(tmp_path)
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = take(iterator, 2)
  restored = make(2)
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  assert_same_batches(take(restored, 2), expected)
  manager.close()
