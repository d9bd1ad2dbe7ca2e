"""Evaluates a trained DOVE: quality per token budget, lengths against complexity, linear probe, throughput.

  python eval.py --workdir runs/tiny                                   the run's latest checkpoint and config
  python eval.py --workdir runs/tiny --step 400 --max_batches 10 --config.data.data_dir=/data/tfds
  python eval.py --workdir runs/dove --inception pt_inception-2015-12-05-6726825d.pth --budgets 32,64,256
  python eval.py --workdir runs/paper --config configs/dove.py --weights dove.safetensors
  python eval.py --workdir runs/dove --inception pt_inception.pth --class_subset configs/imagenet100.txt
                                                                       the paper's rFID table (ImageNet-100)
  python eval.py --workdir runs/dove --probe_dataset cifar10 --probe_data_dir /data/tfds
                                                                       linear probe on CIFAR-10 (train -> test)
  python eval.py --workdir out --config configs/dove.py:tiny             the shipped tiny DOVE (weights/tiny)
  python eval.py --workdir out --config configs/dove.py:tiny --model weights/tiny/dove
                                                                       a model folder (the same model)

Without --config the run's own config (workdir/config.json) is used, and `--config.x.y=...` overrides its
fields as it would a config file's. Writes workdir/eval/metrics.json and PNGs (or to --out). The protocol
of every figure, beside the paper's: docs/evaluation.md. The summary goes to stdout; --verbosity=0 (or -v 0)
shows every library's log on stderr too.
"""

import re
import sys
import tempfile
from pathlib import Path

from absl import app, flags
import jax
import ml_collections
from ml_collections import config_flags

from dove_jax import console, distributed, xla
from dove_jax.evaluation import run
from dove_jax.tensor_io import ConversionError
from dove_jax.weights import MODEL_WEIGHTS, read_model_arguments

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "the training run: its checkpoints/ and config.json (required)"
)
_STEP = flags.DEFINE_integer("step", None, "the checkpoint step (default: the latest)")
_WEIGHTS = flags.DEFINE_string(
    "weights", None, "evaluate this .safetensors weights file instead of a checkpoint"
)
_MODEL = flags.DEFINE_string(
    "model",
    None,
    "evaluate this model folder (config.json + model.safetensors, from save_pretrained or "
    "python -m dove_jax.export): its architecture replaces config.model; --config gives the data",
)
_INCEPTION = flags.DEFINE_string(
    "inception", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth, for rFID"
)
_BUDGETS = flags.DEFINE_list(
    "budgets",
    None,
    "forced token counts, e.g. 32,64,256 (default: the paper's "
    "16..256 up to max_tokens; eighths of max_tokens below 64)",
)
_MAX_BATCHES = flags.DEFINE_integer(
    "max_batches", None, "validation batches (default: the whole split)"
)
_PROBE_PER_CLASS = flags.DEFINE_integer(
    "probe_per_class",
    100,
    "training images of each class for the linear "
    "probe (a seeded, class-balanced random subset); 0 = all",
    lower_bound=0,
)
_PROBE_DATASET = flags.DEFINE_string(
    "probe_dataset",
    None,
    "probe on this TFDS classification set (e.g. cifar10) " "instead of the evaluated data",
)
_PROBE_DATA_DIR = flags.DEFINE_string(
    "probe_data_dir", None, "where --probe_dataset is prepared (default: " "config.data.data_dir)"
)
_PROBE_TRAIN_SPLIT = flags.DEFINE_string(
    "probe_train_split", "train", "--probe_dataset's split the probe fits on"
)
_PROBE_EVAL_SPLIT = flags.DEFINE_string(
    "probe_eval_split", "test", "--probe_dataset's split the probe is scored on"
)
_CLASS_SUBSET = flags.DEFINE_string(
    "class_subset",
    None,
    "a file of class names or ids, one a line: evaluate and "
    "probe only those classes (configs/imagenet100.txt: ImageNet-100)",
)
_UINT8 = flags.DEFINE_bool(
    "uint8",
    True,
    "round reconstructions to 8 bits before every figure, as image files "
    "(pytorch-fid's FID is of saved PNGs); --nouint8 keeps them in float",
)
_OUT = flags.DEFINE_string(
    "out", None, "where metrics.json and the plots go (default: workdir/eval)"
)
flags.mark_flags_as_required(["workdir"])
flags.register_validator(
    "budgets",
    lambda budgets: budgets is None or all(b.isdigit() for b in budgets),
    "--budgets takes positive integers separated by commas, e.g. 32,64,256",
)


def parse_flags(argv: list[str]) -> list[str]:
  """Defines --config once --workdir is known, then parses every flag: without --config on the command
  line, it is the run's own config.json, so that `--config.x.y=...` overrides work on it too."""
  try:
    flags.FLAGS(
        argv, known_only=True
    )  # reads --workdir; --config and its overrides are not defined yet
  except flags.Error:
    pass  # the full parse below reports it
  if _WORKDIR.value and not any(re.match(r"^--?config(=|$)", arg) for arg in argv[1:]):
    try:
      config = run.load_run_config(_WORKDIR.value)
    except FileNotFoundError as e:
      sys.exit(f"eval.py: {e}")
    config_flags.DEFINE_config_dict("config", config, "the run's config (workdir/config.json)")
  else:
    config_flags.DEFINE_config_file(
        "config",
        None,
        "the config file[:preset] the weights were trained with " "(default: workdir/config.json)",
    )
  flags.FLAGS.unparse_flags()
  return app.parse_flags_with_usage(argv)


def shipped_weights(config, workdir: str) -> str | None:
  """The shipped tiny DOVE (or Q-DOVE), for its tiny preset's model in a folder that is not a training run (no
  checkpoints/, no config.json): a run without a checkpoint is an error, never silently another model.
  """
  from configs import dove, qdove

  if any((Path(workdir) / name).exists() for name in ("checkpoints", "config.json")):
    return None
  preset, name = (qdove, "qdove") if "query" in config else (dove, "dove")
  path = dove.SHIPPED / "tiny" / f"{name}.safetensors"
  same_model = config.model.to_dict() == preset.get_config("tiny").model.to_dict()
  return str(path) if same_model and path.is_file() else None


def with_model_folder(config, directory: str):
  """(config with the folder's model arguments as config.model, the folder's weights file); the config's
  model.kernels stays (a folder does not say how the machine computes)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = dict(read_model_arguments(directory), kernels=config.model.kernels)
  config.lock()
  return config, str(Path(directory).expanduser() / MODEL_WEIGHTS)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.configure()
  try:
    distributed.maybe_initialize_distributed()
    config, weights = flags.FLAGS.config, _WEIGHTS.value
    if _MODEL.value:
      if _WEIGHTS.value or _STEP.value is not None:
        raise ValueError("give --model, --weights or --step, not more than one")
      config, weights = with_model_folder(config, _MODEL.value)
    weights = weights or shipped_weights(config, _WORKDIR.value)
    probe_settings = run.ProbeSettings(
        per_class=_PROBE_PER_CLASS.value,
        dataset=_PROBE_DATASET.value,
        data_dir=_PROBE_DATA_DIR.value,
        train_split=_PROBE_TRAIN_SPLIT.value,
        eval_split=_PROBE_EVAL_SPLIT.value,
    )
    out = _OUT.value
    if jax.process_index() > 0:  # every process computes the same figures; process 0 writes them
      out = tempfile.mkdtemp(prefix=f"eval-process-{jax.process_index()}-")
    results = run.evaluate(
        config,
        _WORKDIR.value,
        step=_STEP.value,
        weights=weights,
        budgets=[int(b) for b in _BUDGETS.value] if _BUDGETS.value else None,
        inception=_INCEPTION.value,
        probe_settings=probe_settings,
        max_batches=_MAX_BATCHES.value,
        out=out,
        uint8=_UINT8.value,
        class_subset=_CLASS_SUBSET.value,
    )
  except ConversionError as e:  # the loaders name every parameter that differs, with both shapes
    sys.exit(
        f"eval.py: {e}\nThe config must be the one the weights were trained with (without --config, "
        "eval.py reads workdir/config.json)."
    )
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"eval.py: {e}")
  print(run.format_summary(results))


if __name__ == "__main__":
  xla.restart_with_fast_malloc()  # CPU: no page faults on every call's temporaries
  app.run(main, flags_parser=parse_flags)
