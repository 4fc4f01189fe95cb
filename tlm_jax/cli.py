"""How every tlm_jax command starts: absl flags, quiet logs, bad input as one line.

    if __name__ == "__main__":
      cli.run(main)

Orbax, TFDS and JAX log through absl at INFO; a newcomer would lose the
progress bar in it, so the default shows warnings only (and none from TFDS,
whose warnings are routine). `--verbosity=1` (or `--alsologtostderr`) brings
everything back. A bad flag (a config file that is not there, an unknown
config arg or `--config.KEY`, a value out of range) and a ConfigError print as
one `error: ...` line with exit status 2; other exceptions keep their traceback.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable, Sequence

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from tlm_jax import config as config_lib
from tlm_jax.errors import ConfigError, did_you_mean


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


def load_config(spec: str, keys: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """What `--config SPEC` reads: FILE.py[:ARG] (its get_config(ARG)) or a workdir's
  config.json. Raises ConfigError, naming --config, for a missing file, a bad ARG, or one of
  the override `keys` (`model.taper.start` for --config.model.taper.start) it lacks."""
  is_json = spec.endswith(".json")
  path = spec if is_json else spec.partition(":")[0]
  if not os.path.isfile(path):
    raise ConfigError(
      f"--config {spec}: no such file (give FILE.py[:ARG] or a workdir's config.json)"
    )
  try:
    config = config_lib.from_json(path) if is_json else config_lib.load(spec)
  except ConfigError as e:
    raise ConfigError(f"--config {spec}: {e}") from None
  for key in keys:
    _check_key(config, key)
  return config


def _check_key(config: ml_collections.ConfigDict, key: str) -> None:
  """ConfigError for --config.KEY naming a field the config lacks, with the nearest fields of
  its section (judged on the last name alone: a shared prefix would make every field look
  close)."""
  try:
    parts = config_path.split(key)
  except ValueError:
    raise ConfigError(f"--config.{key}: not a config field path (like model.taper.start)") from None
  node, section = config, "config"
  for part in parts:
    if not isinstance(part, str):  # an index: model.taper.widths[0]
      try:
        node, section = node[part], f"{section}[{part!r}]"
      except (IndexError, KeyError, TypeError):
        raise ConfigError(f"--config.{key}: {section} has no item [{part!r}]") from None
      continue
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{key}: {section} is a value, not a section")
    if part not in node:
      near = [f"{section}.{name}" for name in node if did_you_mean(part, [name])]
      hint = did_you_mean(f"{section}.{part}", near) or f"; its fields are {', '.join(node)}"
      raise ConfigError(f"--config.{key}: {section} has no field {part!r}{hint}")
    node, section = node[part], f"{section}.{part}"


def override_keys(argv: Sequence[str]) -> list[str]:
  """The KEYs of --config.KEY=VALUE (and --[no]config.KEY) on a command line."""
  matches = (re.match(r"-{1,2}(?:no)?config\.([^=]+)", arg) for arg in argv)
  return [m.group(1) for m in matches if m]


class _ConfigParser(flags.ArgumentParser):
  """--config's value -> a locked config, its override keys checked first (ml_collections
  would otherwise stop on an unknown one with a bare AttributeError)."""

  def __init__(self, argv: Sequence[str] | None):
    self.argv = argv

  def parse(self, argument: str) -> ml_collections.ConfigDict:
    config = load_config(argument, override_keys(sys.argv if self.argv is None else self.argv))
    config.lock()
    return config

  def flag_type(self) -> str:
    return "config object"


def config_flag(
  flag_values: flags.FlagValues = flags.FLAGS, argv: Sequence[str] | None = None
) -> flags.FlagHolder:
  """--config FILE.py[:ARG] or DIR/config.json, with --config.x=y overrides; defined only
  when a CLI asks. A test passes its own `flag_values` and `argv` (default: sys.argv)."""
  holder = config_flags.DEFINE_config_file(
    "config", None, "FILE.py[:ARG] or a workdir's config.json.", flag_values, sys_argv=argv
  )
  flag_values["config"].parser = _ConfigParser(argv)
  flags.mark_flag_as_required("config", flag_values)
  return holder


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """flag_values(argv), a bad flag raised as a one-line ConfigError (the config's own when it
  has one; absl lists several bad flags on several lines)."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    cause = e.__cause__ or e.__context__
    if isinstance(cause, ConfigError):
      raise cause from None
    raise ConfigError(str(e).replace("\n", "; ")) from None


def config_from_args(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The config a command given `--config SPEC OVERRIDES...` reads (--config.KEY=VALUE
  overrides), for launchers that pass the same flags on to commands (sweep, fit_table)."""
  argv = ["prog", "--config", spec, *overrides]
  values = flags.FlagValues()
  holder = config_flag(values, argv)
  parse_flags(argv, values)
  return holder.value


def _exit_with(error: ConfigError) -> None:
  print(f"error: {error}", file=sys.stderr, flush=True)
  sys.exit(2)


def run(main: Callable[[Sequence[str]], None]) -> None:
  """app.run(main) with quiet logs and bad flags and config errors as one line, exit 2."""

  def parse(argv: list[str]) -> list[str]:
    try:
      return parse_flags(argv)
    except ConfigError as e:
      _exit_with(e)

  def wrapped(argv: Sequence[str]) -> None:
    quiet_logs()
    try:
      main(argv)
    except ConfigError as e:
      _exit_with(e)

  app.run(wrapped, flags_parser=parse)
