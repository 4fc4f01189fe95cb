"""Where numbers go: metrics.jsonl, TensorBoard, Weights & Biases, the console, and the
FLOP / MFU arithmetic."""

from __future__ import annotations

import secrets
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from tqdm import tqdm

from tlm_jax import sharding, state
from tlm_jax import workdir as workdir_lib
from tlm_jax.errors import ConfigError

# How `flops_per_token` (tlm_jax/model/costs.py), and so every MFU here, counts.
MFU_CONVENTION = (
  "training FLOPs = 3 x forward FLOPs per token of the matmuls (and of Titans' and Hope's "
  "in-context memory updates); causal attention counts the query-key pairs the mask lets "
  "through (about half the square, as MaxText does)"
)

# Dense bf16 peak FLOP/s per chip (datasheets quote twice these, with sparsity), by jax
# `device_kind`; the longest listed prefix of a device's kind wins, and an unlisted chip
# (a CPU) gets no MFU rather than a wrong one.
PEAK_FLOPS = {
  "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM5
  "NVIDIA H100 SXM": 989e12,
  "NVIDIA H100 NVL": 835e12,
  "NVIDIA H100 PCIe": 756e12,
  "NVIDIA H200": 989e12,
  "NVIDIA A100": 312e12,  # SXM4 and PCIe alike
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,  # v5e
  "TPU v5": 459e12,  # v5p
  "TPU v6 lite": 918e12,  # v6e (Trillium)
}


def peak_flops_per_device(device: Any = None) -> float | None:
  """None where the chip is not listed (CPUs): MFU is then not reported."""
  kind = (device or jax.devices()[0]).device_kind
  matches = [prefix for prefix in PEAK_FLOPS if kind.startswith(prefix)]
  return PEAK_FLOPS[max(matches, key=len)] if matches else None


def mfu(
  flops_per_token: int, tokens_per_sec: float, num_devices: int, peak: float | None
) -> float | None:
  return None if peak is None else flops_per_token * tokens_per_sec / (num_devices * peak)


def xla_flops_per_token(config: ml_collections.ConfigDict, compiled: bool = True) -> float:
  """FLOPs per token of the train step as XLA's cost analysis counts them.

  For one device with the layers unrolled, no gradient accumulation and the
  Titans / Hope chunk scans unrolled and not rematerialised: XLA counts a loop
  body once, whatever its trip count, and counts a recompute again. XLA counts
  every op (norms, softmax, the optimizer update), and the full square of
  causal attention, which costs.flops_per_token does not (its
  masked_attention_flops); a check of the accounting, not an MFU.
  compiled=False counts the lowered program before XLA's passes: within ~1.5%
  of the compiled count on the tiny configs, without the compile (seconds, not
  a minute, on a CPU).
  """
  config = config.copy_and_resolve_references()
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.train.grad_accum = 1
  config.model.layers_mode = "unrolled"
  config.model.titans.unroll = config.model.hope.unroll = True
  config.model.titans.remat_chunks = config.model.hope.remat_chunks = 0  # no recompute
  setup = state.setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  tcfg = config.train
  shape = (tcfg.batch_size, tcfg.seq_len)
  tokens = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=setup.batch_sharding)
  program = setup.train_step.lower(setup.abstract_state, dict(inputs=tokens, targets=tokens))
  cost = program.compile().cost_analysis() if compiled else program.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return cost["flops"] / (tcfg.batch_size * tcfg.seq_len)


class MetricsWriter:
  """Appends rows to metrics.jsonl and scalars to TensorBoard and, when a config with
  train.wandb.project is given, to Weights & Biases (process 0 only)."""

  def __init__(
    self, workdir: str, enabled: bool = True, config: ml_collections.ConfigDict | None = None
  ):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter

    self.workdir = workdir
    self.wandb = None
    if config is not None and config.train.wandb.project:
      self.wandb = start_wandb(workdir, config)
    self.tensorboard = SummaryWriter(workdir_lib.path(workdir, workdir_lib.TENSORBOARD))

  def write(self, row: dict[str, Any]) -> None:
    if not self.enabled:
      return
    workdir_lib.append_metrics(self.workdir, row)
    prefix = row.get("split", "train")
    scalars = {
      f"{prefix}/{key}": value
      for key, value in row.items()
      if isinstance(value, (int, float)) and key != "step"
    }
    for name, value in scalars.items():
      self.tensorboard.add_scalar(name, value, row["step"])
    self.tensorboard.flush()
    if self.wandb is not None:
      self.wandb.log(dict(step=row["step"], **scalars))

  def close(self) -> None:
    if self.enabled:
      self.tensorboard.close()
      if self.wandb is not None:
        self.wandb.finish()


def start_wandb(workdir: str, config: ml_collections.ConfigDict) -> Any:
  """A wandb run writing under W/wandb/: the workdir's own run, resumed if it has one.

  Rows are logged against their training step (a wandb metric, not wandb's own step
  counter), so the rows a restart repeats (those after the last checkpoint) are kept
  rather than refused as going back in time. WANDB_MODE=offline needs no network.
  """
  try:
    import wandb  # pylint: disable=g-import-not-at-top  # an optional extra
  except ImportError as e:
    raise ConfigError(
      "train.wandb.project is set but wandb is not installed: pip install 'tlm_jax[wandb]' "
      "(or leave train.wandb.project empty)"
    ) from e
  run_id = workdir_lib.wandb_run_id(workdir, secrets.token_hex(4))  # wandb's: [a-z0-9]{8}
  settings = config.train.wandb
  try:
    run = wandb.init(
      project=settings.project,
      name=settings.name or None,
      tags=list(settings.tags),
      config=config.to_dict(),
      dir=workdir,
      id=run_id,
      resume="allow",
    )
  except wandb.errors.UsageError as e:  # no API key, a bad project name
    raise ConfigError(
      f"train.wandb.project={settings.project!r}: wandb did not start: {e} "
      "(WANDB_MODE=offline logs to W/wandb/ without an account)"
    ) from e
  run.define_metric("step")
  run.define_metric("*", step_metric="step")
  return run


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
