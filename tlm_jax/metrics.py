"""Where numbers go: metrics.jsonl, TensorBoard, the console, and the MFU arithmetic."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
from tqdm import tqdm

# Dense bf16 peak FLOP/s per chip, by jax `device_kind` prefix.
PEAK_FLOPS = {
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,
  "TPU v6e": 918e12,
}


def peak_flops_per_device(device: Any = None) -> float | None:
  """None where the chip is not listed (CPUs): MFU is then not reported."""
  kind = (device or jax.devices()[0]).device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  return None


def mfu(
  flops_per_token: int, tokens_per_sec: float, num_devices: int, peak: float | None
) -> float | None:
  return None if peak is None else flops_per_token * tokens_per_sec / (num_devices * peak)


class MetricsWriter:
  """Appends rows to metrics.jsonl and scalars to TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    prefix = row.get("split", "train")
    for key, value in row.items():
      if isinstance(value, (int, float)) and key != "step":
        self.tensorboard.add_scalar(f"{prefix}/{key}", value, row["step"])
    self.tensorboard.flush()

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()


class Progress:
  """A tqdm bar on a terminal; in a log file (nohup, a TPU VM), one plain line per log step,
  since carriage-return redraws pile up there."""

  def __init__(self, start: int, total: int, enabled: bool = True):
    self.total, self.enabled = total, enabled
    self.bar = None
    if enabled and sys.stderr.isatty():
      self.bar = tqdm(initial=start, total=total, unit="step", dynamic_ncols=True)

  def update(self, row: dict[str, Any]) -> None:
    """Show a training row (step, loss, tokens_per_sec, mfu)."""
    if not self.enabled:
      return
    mfu = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
    fields = dict(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:,.0f}", mfu=mfu)
    if self.bar is None:
      text = " ".join(f"{k} {v}" for k, v in fields.items())
      print(f"step {row['step']}/{self.total} {text}", file=sys.stderr, flush=True)
      return
    self.bar.update(row["step"] - self.bar.n)
    self.bar.set_postfix(fields, refresh=False)

  def write(self, line: str) -> None:
    """A line that does not break the bar (evaluation results, notices)."""
    if self.enabled:
      (self.bar.write if self.bar is not None else print)(line)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]
