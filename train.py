"""Trains DOVE.

  python train.py --config configs/dove.py:tiny --workdir runs/tiny
  python train.py --config configs/dove.py --workdir runs/dove --config.init.vqgan=... --config.init.pythia=...

Re-running the same command resumes from the latest checkpoint in --workdir. SIGTERM saves and exits.
It prints a progress line every config.train.log_every steps, a line per evaluation, and warnings;
--verbosity=0 (or -v 0) every library's log too. Every figure goes to TensorBoard (--workdir).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from dove_jax import console, xla
from dove_jax.training.loop import train_and_evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file[:preset]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics and the run's config go here")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  console.configure()
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (FileNotFoundError, ValueError) as e:
    # A config, data or weights error is one line. A ValueError can also be a bug: --verbosity keeps its
    # traceback.
    if console.verbose():
      raise
    sys.exit(f"train.py: {e}")


if __name__ == "__main__":
  xla.restart_with_fast_malloc()  # CPU: no page faults on every step's temporaries
  app.run(main)
