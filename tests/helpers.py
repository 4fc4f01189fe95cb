"""Shared by the tests: repo paths, config loading, and a few train steps on a mesh."""

import importlib.util
import pathlib

from tlm_jax import config as config_lib
from tlm_jax import metrics, sharding, state
from tlm_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg: str | None = None):
  """A fresh config from configs/NAME.py[:ARG], as --config reads it."""
  path = REPO / "configs" / f"{name}.py"
  return config_lib.load(f"{path}:{arg}" if arg else str(path))


def load_module(relative_path: str):
  """A script of the repo that is not in the package (e.g. launch/local.py) as a module."""
  path = REPO / relative_path
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_steps(config, batches, mesh_sizes, devices):
  """Train steps on a mesh of `devices` shaped by `mesh_sizes`: (losses, final state)."""
  config.mesh.update(mesh_sizes)
  run = state.setup(config, sharding.make_mesh(config.mesh, devices))
  train_state, losses = run.init_fn(), []
  for batch in batches:
    train_state, metrics = run.train_step(
      train_state, sharding.to_global(batch, run.batch_sharding)
    )
    losses.append(float(metrics["loss"]))
  return losses, train_state


def xla_flops_per_token(config) -> float:
  """XLA's FLOPs per token of the config's train step (tlm_jax.metrics: one device, layers
  and chunk scans unrolled), counted on the lowered program: within ~1.5% of the compiled
  one's count on the tiny configs, without minutes of CPU compiles."""
  return metrics.xla_flops_per_token(config, compiled=False)


def train_losses(workdir) -> dict[int, float]:
  """Training loss by step from a workdir's metrics.jsonl (evaluation rows left out)."""
  return {r["step"]: r["loss"] for r in workdir_lib.training_rows(workdir)}
