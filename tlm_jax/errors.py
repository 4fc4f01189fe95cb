"""The one error type for bad configs: raised before anything is built or compiled."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and the fix."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
  """'; did you mean 'x' or 'y'?' for the nearest of `choices`, or '' when none is close:
  appended to an error about an unknown name (a key, a scale, a backbone)."""
  close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.6)
  return "; did you mean " + " or ".join(repr(c) for c in close) + "?" if close else ""
