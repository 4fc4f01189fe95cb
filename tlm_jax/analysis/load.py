"""What every analysis reads and writes besides the restored workdir (tlm_jax/restore.py):
validation windows, `analysis_NAME.json` and `analysis_NAME.png`.

Figures are plain `matplotlib.figure.Figure`s (no pyplot, no global backend),
so a notebook can show what a CLI saves, and saving needs no display.
"""

from __future__ import annotations

import itertools
from typing import Any

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from tlm_jax import workdir as workdir_lib
from tlm_jax.data import pipeline
from tlm_jax.errors import ConfigError


def validation_batches(
  config: ml_collections.ConfigDict, batches: int, batch_size: int = 0
) -> list[dict[str, np.ndarray]]:
  """The first `batches` validation batches {'inputs', 'targets'} (B, T): the same every call.

  batch_size 0 keeps train.batch_size; the window length stays train.seq_len, as trained.
  """
  if batches < 1 or batch_size < 0:
    raise ConfigError(f"--batches={batches} must be >= 1 and --batch_size={batch_size} >= 0")
  config = config.copy_and_resolve_references()
  config.train.batch_size = batch_size or config.train.batch_size
  data_iter = pipeline.make_iterator(config, config.data.eval_split)
  return list(itertools.islice(data_iter, batches))


def write_json(workdir: str, name: str, result: dict[str, Any]) -> str:
  return workdir_lib.write_analysis(workdir, name, result)


def save_figure(fig: Figure, workdir: str, name: str) -> str:
  path = workdir_lib.analysis_path(workdir, name, "png")
  fig.savefig(path, dpi=120, bbox_inches="tight")
  return path


def workdir_list(values: list[str]) -> list[str]:
  """--workdir given repeatedly, as a comma list, or both."""
  return [w for w in itertools.chain.from_iterable(v.split(",") for v in values) if w]
