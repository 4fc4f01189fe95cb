"""What every analysis reads and writes: a workdir's trained decoder, validation windows,
`analysis_NAME.json` and `analysis_NAME.png`.

Figures are plain `matplotlib.figure.Figure`s (no pyplot, no global backend),
so a notebook can show what a CLI saves, and saving needs no display.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from matplotlib.figure import Figure

from tlm_jax import evaluate
from tlm_jax.data import pipeline
from tlm_jax.errors import ConfigError
from tlm_jax.model import lm


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained workdir: its config, the step restored, and the decoder at that step."""

  workdir: str
  config: ml_collections.ConfigDict
  step: int
  model: lm.Decoder

  @property
  def label(self) -> str:
    """Folder name and taper, for legends: 'w (cosine 1.5->0.5)'."""
    taper = self.config.model.taper
    shape = taper.schedule
    if shape in ("cosine", "linear", "sigmoid", "stepped"):
      shape += f" {taper.start:g}->{taper.end:g}"
    return f"{os.path.basename(os.path.normpath(self.workdir))} ({shape})"


def restore(workdir: str, devices: Sequence[jax.Device] | None = None) -> Run:
  """The latest checkpoint of a training workdir as a Decoder, laid out as in training on
  the config's mesh over `devices` (default: all), which must fit that mesh."""
  restored = evaluate.restore(workdir, devices)
  return Run(workdir, restored.config, restored.step, restored.model)


def validation_batches(
  config: ml_collections.ConfigDict, batches: int, batch_size: int = 0
) -> list[dict[str, np.ndarray]]:
  """The first `batches` validation batches {'inputs', 'targets'} (B, T): the same every call.

  batch_size 0 keeps train.batch_size; the window length stays train.seq_len
  (Titans and Hope need it to be a multiple of their chunk sizes).
  """
  if batches < 1 or batch_size < 0:
    raise ConfigError(f"--batches={batches} must be >= 1 and --batch_size={batch_size} >= 0")
  config = config.copy_and_resolve_references()
  config.train.batch_size = batch_size or config.train.batch_size
  data_iter = pipeline.make_iterator(config, config.data.eval_split)
  return list(itertools.islice(data_iter, batches))


def output_path(workdir: str, name: str, suffix: str) -> str:
  return os.path.join(workdir, f"analysis_{name}.{suffix}")


def write_json(workdir: str, name: str, result: dict[str, Any]) -> str:
  path = output_path(workdir, name, "json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  return path


def save_figure(fig: Figure, workdir: str, name: str) -> str:
  path = output_path(workdir, name, "png")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  return path


def workdir_list(values: list[str]) -> list[str]:
  """--workdir given repeatedly, as a comma list, or both."""
  return [w for w in itertools.chain.from_iterable(v.split(",") for v in values) if w]
