"""train.py, eval.py and export end to end: the tests' 3-step tiny run (conftest.tiny_run), what it
recorded and printed, its evaluation and export from the command line, and their clean error exits.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from flax import nnx
from test_console import tensorboard_tags
from test_eval_metrics import counted_inception  # noqa: F401 (a fixture)
from test_training import python

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(builtin_data_dir):
  return builtin_data_dir


@pytest.fixture(scope="module")
def run_dir(tiny_run):
  """The tests' tiny run (3 steps of train.py): a checkpoint and the run's config.json."""
  return tiny_run[0]


def test_three_step_tiny_run_from_the_command_line(tiny_run):
  run, result = tiny_run  # with its own compilation cache, not the tests' shared one
  assert (run / "checkpoints" / "3").is_dir()
  assert list((run / "compilation_cache").glob("jit_train_step-*")), "the train step was not cached"
  assert json.loads((run / "config.json").read_text())["model"]["image_size"] == 64
  recorded = tensorboard_tags(run)
  for name in (
      "train/rec",
      "train/lpips",
      "train/eos",
      "train/length_mean",
      "train/eos_threshold",
      "train/lambda_eos",
      "train/grad_norm",
      "train/learning_rate",
      "eval/mse",
  ):
    assert name in recorded, f"{name} not in TensorBoard"
  # Quiet by default: a progress line per logged step (with its mean length), no library's INFO lines.
  printed = (result.stdout + result.stderr).splitlines()
  progress = [line for line in printed if line.startswith("step ")]
  assert [line.split(":")[0] for line in progress] == ["step 1/3", "step 2/3", "step 3/3"], printed
  assert all(re.search(r", length \d", line) for line in progress), progress
  # The tiny preset's 2,500 steps print these others, 50 progress lines and 5 evaluations': <= 60 lines.
  assert len(printed) - len(progress) <= 6, printed


def test_eval_writes_every_figure_and_plot(run_dir, data_dir):
  from PIL import Image
  from dove_jax.evaluation import run

  result = python(
      [
          "eval.py",
          f"--workdir={run_dir}",
          "--max_batches=2",
          "--probe_per_class=2",
          "--probe_dataset=dove_shapes/64",
          f"--probe_data_dir={data_dir}",
          "--probe_eval_split=validation",
          f"--config.data.data_dir={data_dir}",
      ]
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert re.search(
      r"throughput: encode [\d.]+ images/s \(in chunks of 32: [\d.]+\), decode [\d.]+ images/s",
      result.stdout,
  ), result.stdout

  out = run_dir / "eval"
  results = json.loads((out / "metrics.json").read_text())
  assert results["model"] == {"checkpoint": str(run_dir / "checkpoints"), "step": 3}
  assert results["settings"]["num_images"] == 16 and results["settings"]["budgets"] == [16, 32, 64]
  conventions = results["settings"]["conventions"]
  assert conventions == run.conventions(uint8=True) and "[0, 1]" in conventions["ssim"]
  assert "rounded to 8 bits" in conventions["reconstruction"]
  assert set(results["reconstruction"]) == {"predicted", "16", "32", "64"}
  for key, figures in results["reconstruction"].items():
    for name in ("mean_length", "mse", "psnr", "psnr_per_image", "ssim", "lpips"):
      assert isinstance(figures[name], float), (key, name, figures)
    assert figures["rfid"] == run.RFID_UNAVAILABLE
  assert results["reconstruction"]["32"]["mean_length"] == 32.0

  lengths = results["lengths"]
  assert sum(lengths["histogram"].values()) == 16 and len(lengths["histogram"]) == 64
  assert (
      set(lengths["spearman"])
      == set(lengths["deciles"])
      == {"laplacian_variance", "dataset_complexity"}
  )
  for rho in lengths["spearman"].values():  # undefined (None) where every length is the same
    assert rho is None or -1 <= rho <= 1
  deciles = lengths["deciles"]["laplacian_variance"]
  assert len(deciles) == 10 and sum(d["images"] for d in deciles) == 16
  assert [d["complexity_min"] for d in deciles] == sorted(d["complexity_min"] for d in deciles)

  probe = results[
      "linear_probe"
  ]  # on dove_shapes/64 named as a separate data set: 2 images a class
  assert probe["num_classes"] == 10 and probe["train_images"] == 20 and probe["eval_images"] == 16
  assert 0 <= probe["accuracy"] <= 1 and 0 <= probe["train_accuracy"] <= 1
  protocol = probe["protocol"]
  assert protocol["data"] == {
      "source": "tfds",
      "name": "dove_shapes/64",
      "data_dir": str(data_dir),
      "split": "validation",
      "train_split": "train",
      "records": 512,
  }
  assert protocol["per_class"] == 2 and protocol["train_images_per_class"] == {"min": 2, "max": 2}
  assert protocol["seed"] == 0 and protocol["l2"] == 1e-4 and "mean" in protocol["features"]
  speed = results["throughput"]
  assert (
      min(
          speed["encode_images_per_s"],
          speed["encode_chunked_images_per_s"],
          speed["decode_images_per_s"],
      )
      > 0
  )

  for name in ("reconstructions", "length_histogram", "complexity_vs_length", "quality_vs_budget"):
    with Image.open(out / f"{name}.png") as image:
      image.load()
      assert image.width > 200 and image.height > 200, (name, image.size)


def test_missing_checkpoint_exits_naming_the_folder(run_dir, tmp_path):
  shutil.copy(
      run_dir / "config.json", tmp_path / "config.json"
  )  # a run that never saved a checkpoint
  result = python(["eval.py", f"--workdir={tmp_path}"])
  assert result.returncode != 0
  assert f"no checkpoint folder {tmp_path / 'checkpoints'}" in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr


def test_config_that_does_not_match_the_checkpoint_names_parameter_and_shapes(run_dir):
  result = python(
      [
          "eval.py",
          f"--workdir={run_dir}",
          "--config",
          "configs/dove.py:tiny",
          "--config.model.generator.d_model=32",
      ]
  )
  assert result.returncode != 0
  assert re.search(
      r"parameter generator/\S+: checkpoint shape \(\d+(, \d+)*\) != model shape \(\d+(, \d+)*\)",
      result.stderr,
  ), result.stderr[-3000:]
  assert "Traceback" not in result.stderr


def test_shipped_weights_only_for_the_tiny_model_outside_a_run(run_dir, tmp_path):
  sys.path.insert(0, str(ROOT))
  import eval as eval_script
  from configs import dove, qdove

  tiny = dove.get_config("tiny")
  assert eval_script.shipped_weights(tiny, str(tmp_path)) == str(
      dove.SHIPPED / "tiny" / "dove.safetensors"
  )
  assert eval_script.shipped_weights(qdove.get_config("tiny"), str(tmp_path)) == str(
      dove.SHIPPED / "tiny" / "qdove.safetensors"
  )
  assert (
      eval_script.shipped_weights(tiny, str(run_dir)) is None
  )  # a run's own checkpoint comes first
  (tmp_path / "config.json").write_text("{}")
  assert (
      eval_script.shipped_weights(tiny, str(tmp_path)) is None
  )  # a run that never saved: an error, not these
  tiny.model.token_dim = 8
  assert eval_script.shipped_weights(tiny, str(tmp_path / "empty")) is None  # another model


def test_folder_eval_reads_only_held_out_images_and_says_so(tmp_path):
  from configs import dove
  from dove_jax import builders
  from dove_jax.evaluation import run
  from dove_jax.training import loop
  from test_data import png_folder

  config = dove.get_config("tiny")
  config.data.source, config.data.folder, config.data.eval_fraction = (
      "folder",
      str(png_folder(tmp_path)),
      0.25,
  )
  train, held = run.data_sources(config)
  train_paths = {train[i]["path"] for i in range(len(train))}
  eval_paths = {held[i]["path"] for i in range(len(held))}
  assert not train_paths & eval_paths and len(train_paths | eval_paths) == 120
  trained = builders.data_sources(config)[
      0
  ]  # what train.py reads: the same part, never a held-out image
  assert {trained[i]["path"] for i in range(len(trained))} == train_paths
  described = run.describe_data(config, held)
  assert described["source"] == "folder" and described["folder"] == str(tmp_path)
  assert described["eval_fraction"] == 0.25 and described["records"] == len(eval_paths)
  assert described["split"].startswith("held out")
  config.data.eval_fraction = 1.0  # a folder only evaluated: training refuses it before any compute
  with pytest.raises(ValueError, match="no image to train on.*eval_fraction = 1.0"):
    loop.check_training_data(builders.data_sources(config)[0], config)


def test_class_subset_limits_both_splits_and_is_named_in_metrics(data_dir, tmp_path):
  from configs import dove
  from dove_jax.data import sources
  from dove_jax.evaluation import run

  config = dove.get_config("tiny")
  config.data.data_dir = str(data_dir)
  listed = tmp_path / "shapes.txt"
  listed.write_text("ring\ncircle\n")
  train, held = run.data_sources(config, str(listed))
  for part in (train, held):
    assert part.classes == ["ring", "circle"] and set(part.labels()) == {0, 1}
    assert set(sources.record_labels(part.source)[part.indices]) == {
        8,
        3,
    }  # dove_shapes' ids of the two
  described = run.describe_data(config, held, str(listed))
  assert described["class_subset"] == {"file": str(listed), "classes": ["ring", "circle"]}
  assert described["records"] == len(held) and described["split"] == "validation"


def test_a_batch_the_devices_do_not_divide_is_refused_naming_the_field(monkeypatch, tmp_path):
  """Evaluation splits each batch over every device: 8 images on 3 devices fail before any compute."""
  import types

  from configs import dove
  from dove_jax.evaluation import run

  monkeypatch.setattr(run.meshlib, "make_mesh", lambda: types.SimpleNamespace(size=3))
  config = dove.get_config("tiny")
  config.data.global_batch_size = 8
  message = "config.data.global_batch_size = 8 is not a multiple of the 3 devices"
  with pytest.raises(ValueError, match=message):
    run.evaluate(config, tmp_path, weights=str(dove.SHIPPED / "tiny" / "dove.safetensors"))


def test_a_second_evaluation_reuses_the_real_images_inception_statistics(
    data_dir, tmp_path, monkeypatch, counted_inception
):
  """Two evaluations of the shipped tiny DOVE's model folder with rFID (Inception replaced by cheap features, counted): the
  first runs Inception over the real batch and the 3 reconstructions (predicted, 64, VQ-GAN), the second over
  the reconstructions only, and both give the same rFID."""
  from configs import dove
  from dove_jax.evaluation import fid, run

  sys.path.insert(0, str(ROOT))
  import eval as eval_script

  # A stand-in without weights: counted_inception's features read the images alone.
  monkeypatch.setattr(fid, "load_inception", lambda path: nnx.Module())
  config = dove.get_config("tiny")
  # Through the shipped model folder (eval.py --model), whose arguments replace the config's model.
  tiny_model = config.model.to_dict()
  config.model.token_dim = 8
  config, model_weights = eval_script.with_model_folder(config, str(dove.SHIPPED / "tiny" / "dove"))
  folder_model = config.model.to_dict()
  assert all(folder_model[name] == value for name, value in tiny_model.items() if name != "dtype")
  config.unlock()
  config.data.data_dir, config.data.global_batch_size, config.train.compilation_cache = (
      str(data_dir),
      8,
      False,
  )
  weights = tmp_path / "inception.pth"
  weights.write_bytes(b"weights")
  results = []
  for name in ("first", "second"):
    results.append(
        run.evaluate(
            config,
            tmp_path,
            weights=model_weights,
            budgets=[64],
            inception=str(weights),
            max_batches=1,
            out=tmp_path / name,
            probe_settings=run.ProbeSettings(per_class=1),
        )
    )
  assert counted_inception == [8] * 4 + [8] * 3
  first, second = (r["settings"]["reference_statistics"] for r in results)
  assert not first["reused"] and second["reused"] and first["file"] == second["file"]
  assert Path(first["file"]).parent == tmp_path / "reference_statistics"
  for key in ("predicted", "64"):
    assert (
        results[0]["reconstruction"][key]["rfid"] == results[1]["reconstruction"][key]["rfid"] > 0
    )
  probe = results[0][
      "linear_probe"
  ]  # by default on the evaluated data set: its train split, one a class
  assert probe["protocol"]["data"] == results[0]["settings"]["data"] and probe["train_images"] == 10


def test_export_writes_a_run_as_a_model_folder(run_dir, tmp_path):
  from dove_jax import DOVE, portable

  result = python(["-m", "dove_jax.export", f"--workdir={run_dir}", f"--out={tmp_path / 'model'}"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"of step 3 to {tmp_path / 'model'}" in result.stdout
  model = DOVE.from_pretrained(tmp_path / "model")
  assert model.max_tokens == 64 and model.image_size == 64
  assert all(  # the portable encode and decode, by default
      (tmp_path / "model" / name).is_file()
      for name in (portable.ENCODE_FILE, portable.DECODE_FILE, portable.PORTABLE_CONFIG)
  )
  result = python(
      ["-m", "dove_jax.export", f"--workdir={run_dir}", f"--out={tmp_path / 'vq'}", "--part=vqgan"]
  )
  assert result.returncode != 0 and "--part writes a .safetensors file" in result.stderr
