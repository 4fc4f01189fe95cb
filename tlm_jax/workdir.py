"""The workdir format: every file a run's folder holds is named, written and read here.

    W/config.json             the resolved config (read back over today's defaults)
    W/widths.json             MLP width per layer
    W/metrics.jsonl           one object per line: training rows (no "split"), evaluation rows
                              ("split": a data split, or "task:NAME" for a zero-shot task)
    W/checkpoints/            Orbax (tlm_jax/checkpoint.py)
    W/tensorboard/            the same scalars for TensorBoard
    W/eval_SPLIT_STEP.json    a split evaluated by `python -m tlm_jax.evaluate`
    W/tasks_STEP.json         zero-shot task results {TASK: metrics}; W/niah_STEP.png
    W/analysis_NAME.json/png  an analysis (tlm_jax/analysis)
    W/wandb/, W/wandb_run_id  the Weights & Biases run (train.wandb.project) and its id, so a
                              resumed run logs into the same one
    W/profile/                jax.profiler traces (train.profile_steps): plugins/profile/TIME/
                              HOST.xplane.pb for TensorBoard, HOST.trace.json.gz for Perfetto

Pure: tools and tests that read results need no accelerator.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import ml_collections

from tlm_jax import config as config_lib

CONFIG = "config.json"
WIDTHS = "widths.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
WANDB_RUN_ID = "wandb_run_id"
PROFILE = "profile"


def path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def is_workdir(folder: str) -> bool:
  """A folder a run has written to (its config, or at least metrics)."""
  return any(os.path.exists(path(folder, name)) for name in (CONFIG, METRICS))


def _read_json(file: str) -> Any:
  with open(file) as f:
    return json.load(f)


def _write_json(file: str, value: Any) -> None:
  with open(file, "w") as f:
    json.dump(value, f, indent=1)


def wandb_run_id(workdir: str, new_id: str) -> str:
  """The workdir's wandb run id: the one written before, else `new_id`, written now."""
  file = path(workdir, WANDB_RUN_ID)
  if not os.path.exists(file):
    with open(file, "w") as f:
      f.write(new_id)
  with open(file) as f:
    return f.read().strip()


# ---------------------------------------------------------------------------
# config.json and widths.json: what was trained.
# ---------------------------------------------------------------------------


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(path(workdir, CONFIG), "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))


def has_config(workdir: str) -> bool:
  return os.path.exists(path(workdir, CONFIG))


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The workdir's config over today's defaults (config.from_json); a one-line error when
  the workdir has none."""
  return config_lib.from_json(path(workdir, CONFIG))


def write_widths(workdir: str, widths: Sequence[int]) -> None:
  with open(path(workdir, WIDTHS), "w") as f:
    json.dump([int(w) for w in widths], f)


def read_widths(workdir: str) -> list[int] | None:
  """None for a workdir written before widths.json existed."""
  file = path(workdir, WIDTHS)
  return _read_json(file) if os.path.exists(file) else None


# ---------------------------------------------------------------------------
# metrics.jsonl.
# ---------------------------------------------------------------------------


def append_metrics(workdir: str, row: dict[str, Any]) -> None:
  """Adds a row at the end of metrics.jsonl. A last line cut short (a run killed mid-write)
  is dropped first, so the rows after it stay readable."""
  with open(path(workdir, METRICS), "a+b") as f:
    if f.seek(0, os.SEEK_END):
      f.seek(-1, os.SEEK_END)
      if f.read(1) != b"\n":
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)
    f.write((json.dumps(row) + "\n").encode())


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """Every row in order; [] before the first. A last line without its newline (being
  written now, or cut short) is left out."""
  file = path(workdir, METRICS)
  if not os.path.exists(file):
    return []
  with open(file) as f:
    lines = f.read().split("\n")
  return [json.loads(line) for line in lines[:-1] if line.strip()]


def training_rows(workdir: str) -> list[dict[str, Any]]:
  return [row for row in read_metrics(workdir) if "split" not in row]


def evaluations(workdir: str, split: str) -> dict[int, dict[str, Any]]:
  """Evaluation rows of `split` by step: those training logged, then eval_SPLIT_STEP.json
  files (the evaluation CLI) for steps training did not evaluate."""
  found = {row["step"]: row for row in read_metrics(workdir) if row.get("split") == split}
  for _, file in _by_step(workdir, f"eval_{re.escape(split)}"):
    row = _read_json(file)
    found.setdefault(row["step"], row)
  return found


# ---------------------------------------------------------------------------
# Results the tools write: evaluations, tasks, analyses.
# ---------------------------------------------------------------------------


def _by_step(workdir: str, prefix_pattern: str) -> list[tuple[int, str]]:
  """(step, path) of the files PREFIX_STEP.json in a workdir, by step."""
  if not os.path.isdir(workdir):
    return []
  found = []
  for name in os.listdir(workdir):
    match = re.fullmatch(rf"{prefix_pattern}_(\d+)\.json", name)
    if match:
      found.append((int(match.group(1)), path(workdir, name)))
  return sorted(found)


def write_evaluation(workdir: str, row: dict[str, Any]) -> str:
  """eval_SPLIT_STEP.json from a row holding `split` and `step`; returns its path."""
  file = path(workdir, f"eval_{row['split']}_{row['step']}.json")
  with open(file, "w") as f:
    json.dump(row, f)
  return file


def write_tasks(workdir: str, step: int, results: dict[str, dict[str, Any]]) -> str:
  """tasks_STEP.json, merged over an earlier file of the same step (other tasks kept)."""
  file = path(workdir, f"tasks_{step}.json")
  merged = _read_json(file) if os.path.exists(file) else {}
  merged.update(results)
  _write_json(file, merged)
  return file


def latest_tasks(workdir: str) -> dict[str, dict[str, Any]] | None:
  """The highest step's tasks_STEP.json; None when no tasks were evaluated."""
  found = _by_step(workdir, "tasks")
  return _read_json(found[-1][1]) if found else None


def niah_path(workdir: str, step: int) -> str:
  return path(workdir, f"niah_{step}.png")


def analysis_path(workdir: str, name: str, suffix: str) -> str:
  """analysis_NAME.SUFFIX (json, png)."""
  return path(workdir, f"analysis_{name}.{suffix}")


def write_analysis(workdir: str, name: str, result: dict[str, Any]) -> str:
  file = analysis_path(workdir, name, "json")
  _write_json(file, result)
  return file


def read_analysis(workdir: str, name: str) -> dict[str, Any] | None:
  file = analysis_path(workdir, name, "json")
  return _read_json(file) if os.path.exists(file) else None
