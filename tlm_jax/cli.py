"""How every tlm_jax command starts: absl flags, quiet logs, bad input as one line.

    if __name__ == "__main__":
      cli.run(main)

Orbax, TFDS and JAX log through absl at INFO; a newcomer would lose the
progress bar in it, so the default shows warnings only (and none from TFDS,
whose warnings are routine). `--verbosity=1` (or `--alsologtostderr`) brings
everything back. A ConfigError prints as `error: ...` with exit status 2;
other exceptions keep their traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from tlm_jax.errors import ConfigError


class _QuietLibraries(logging.Filter):
  """Drops routine TFDS warnings (custom builder configs, dataset versions)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR or "tensorflow_datasets" not in record.pathname


def quiet_logs() -> None:
  """Warnings and errors only, unless the command line asked for more."""
  if flags.FLAGS["verbosity"].present or flags.FLAGS["alsologtostderr"].present:
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def config_flag() -> flags.FlagHolder:
  """--config FILE.py[:ARG] with --config.x=y overrides; defined only when a CLI asks."""
  holder = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
  flags.mark_flag_as_required("config")
  return holder


def run(main: Callable[[Sequence[str]], None]) -> None:
  """app.run(main) with quiet logs and one-line config errors (exit status 2)."""

  def wrapped(argv: Sequence[str]) -> None:
    quiet_logs()
    try:
      main(argv)
    except ConfigError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(wrapped)
