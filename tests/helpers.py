"""Shared by the tests: repo paths, config loading, a few train steps on a mesh, and the
tiny trained workdir."""

import importlib.util
import json
import os
import pathlib

from flax import nnx

from tlm_jax import config as config_lib
from tlm_jax import metrics, sharding, state
from tlm_jax import workdir as workdir_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_WORKDIR_STEPS = 12
TINY_WORKDIR_SEQ_LEN = 64


def load_config(name: str, arg: str | None = None):
  """A fresh config from configs/NAME.py[:ARG], as --config reads it."""
  path = REPO / "configs" / f"{name}.py"
  return config_lib.load(f"{path}:{arg}" if arg else str(path))


def one_device_env() -> dict[str, str]:
  """The environment of a CLI run on one CPU device, as a user runs it: conftest's XLA flags
  without the 8 simulated devices."""
  flags = [f for f in os.environ["XLA_FLAGS"].split() if "device_count" not in f]
  return dict(os.environ, XLA_FLAGS=" ".join(flags))


def load_module(relative_path: str):
  """A script of the repo that is not in the package (e.g. launch/local.py) as a module."""
  path = REPO / relative_path
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# A model's logits through one compiled program, traced again only for a new graph (e.g.
# after lm.set_layers_mode): called eagerly, op by op, a tiny Titans or Hope forward pass
# costs three times the CPU.
forward = nnx.jit(lambda model, tokens_BT: model(tokens_BT))


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


def train_tiny_workdir(root: pathlib.Path) -> pathlib.Path:
  """configs/tlm_transformer.py:tiny (cosine widths 384, 320, 192, 128) trained
  TINY_WORKDIR_STEPS steps of 8 x 64 bytes in ROOT/run, one checkpoint and one validation row
  at the end. The corpus (ROOT/corpus.jsonl) repeats itself, so a few steps teach something."""
  from tlm_jax import train

  lines = [f"the cat sat on the mat {i}. the dog sat on the log. " * 4 for i in range(60)]
  docs = [json.dumps(dict(text=line)) for line in lines]
  (root / "corpus.jsonl").write_text("\n".join(docs))
  config = load_config("tlm_transformer", "tiny")
  config.data.update(source="local", files=str(root / "corpus.jsonl"), data_dir=str(root / "tfds"))
  config.train.update(
    steps=TINY_WORKDIR_STEPS,
    batch_size=8,
    seq_len=TINY_WORKDIR_SEQ_LEN,
    learning_rate=3e-3,
    warmup_steps=5,
    log_every=TINY_WORKDIR_STEPS,
    eval_every=TINY_WORKDIR_STEPS,
    eval_batches=1,
    checkpoint_every=TINY_WORKDIR_STEPS,
  )
  train.train(config, str(root / "run"))
  return root / "run"
