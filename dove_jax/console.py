"""What train.py and eval.py print: by default dove_jax's own lines (as bare messages) and every library's
warnings and errors; the libraries' INFO logs (orbax's checkpoint steps, TFDS's "Reusing dataset", grain,
JAX, TensorFlow's C++ start-up lines) only with absl's `--verbosity` (`-v 0`: every INFO line, as absl
prints it).
"""

import logging
import os
import re
import sys
import tempfile

from absl import flags
from absl import logging as absl_logging

PACKAGE = os.path.dirname(os.path.abspath(__file__))
# A C++ log record starts with its severity and date, or is absl's own WARNING line; a message may run on
# over more lines ("To enable the following instructions: ...").
NATIVE_RECORD = re.compile(r"^(?=[IWEF]\d{4} |WARNING: )", re.MULTILINE)
# What TensorFlow's C++ side logs on import: INFO records ("oneDNN custom operations are on") and absl's
# note that it logs before being initialised.
NATIVE_START_UP = re.compile(
    r"I\d{4} |WARNING: All log messages before absl::InitializeLog\(\) is called"
)


def ours_or_warning(record: logging.LogRecord) -> bool:
  """Whether a record is shown by default: any warning or error, INFO only from dove_jax. absl names the
  calling file of every record, the only mark of a library's INFO line (they all log through "absl").
  """
  return record.levelno > logging.INFO or os.path.abspath(record.pathname).startswith(
      PACKAGE + os.sep
  )


def verbose(flag_values: flags.FlagValues = flags.FLAGS) -> bool:
  """Whether `--verbosity` (or `-v`) was given: then every library's log, as absl prints it."""
  return flag_values["verbosity"].present > 0


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow (clu's TensorBoard writer and TFDS need it) with file descriptor 2 captured, and
  passes on what it printed but its start-up INFO lines. Its C++ side logs those before absl's logging is
  initialised, which ignores TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442)."""
  sys.stderr.flush()
  stderr = os.dup(2)
  with tempfile.TemporaryFile("w+") as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401 (every later import gets this module)
    finally:
      sys.stderr.flush()
      os.dup2(stderr, 2)
      os.close(stderr)
      captured.seek(0)
      records = NATIVE_RECORD.split(captured.read())
      sys.stderr.write("".join(record for record in records if not NATIVE_START_UP.match(record)))


def configure(flag_values: flags.FlagValues = flags.FLAGS, tensorflow: bool = True) -> None:
  """Quiets the libraries unless `verbose()`; `tensorflow`: import it now, quietly (a tool that never
  imports it, as the tokenizer, saves the 8 s)."""
  if verbose(flag_values):
    return
  if tensorflow:
    import_tensorflow_quietly()
  if not flag_values["showprefixforinfo"].present:
    flag_values.showprefixforinfo = False  # absl's own switch: INFO lines without time and file
  absl_logging.get_absl_handler().addFilter(ours_or_warning)
