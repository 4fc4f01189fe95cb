"""Grouped layers held stacked: same training as unrolled, no per-step restacking, and
checkpoints that move between the two layouts (resume, evaluate)."""

import os
import re
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import helpers
from helpers import run_steps
from tlm_jax import evaluate, generate, restore, sharding, state, train
from tlm_jax.data import pipeline
from tlm_jax.errors import ConfigError
from tlm_jax.model import lm
from tlm_jax.workdir import read_metrics

STEPS = 6
GROUPS = ((0, 1), (2, 3))  # small_config's layers in grouped mode


MESH = dict(data=2, fsdp=2, tensor=2)


def small_config(data_dir, layers_mode: str, steps: int = STEPS):
  """configs/demo.py made small, with two widths of two layers each (two stacks), on an
  fsdp x tensor MESH: the runs below train with the steps the first test compiles."""
  config = helpers.load_config("demo")
  config.mesh.update(MESH)
  config.model.update(d_model=64, mlp_width=256, num_heads=4, layers_mode=layers_mode)
  config.model.taper.update(schedule="stepped", steps=2)
  config.train.update(
    batch_size=8,
    seq_len=64,
    steps=steps,
    warmup_steps=2,
    log_every=1,
    eval_every=STEPS,
    eval_batches=2,
    checkpoint_every=3,
  )
  config.data.data_dir = str(data_dir)
  return config


@pytest.fixture(scope="module")
def data_dir(builtin_data_dir):
  return builtin_data_dir


@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory, data_dir):
  """A grouped run of STEPS steps, checkpoints at 3 and 6, evaluated at 6."""
  workdir = tmp_path_factory.mktemp("grouped")
  train.train(small_config(data_dir, "grouped"), str(workdir))
  return workdir


def test_grouped_training_matches_unrolled_on_an_fsdp_tensor_mesh(data_dir):
  config = small_config(data_dir, "unrolled")
  data_iter = pipeline.make_iterator(config, "train")
  batches = [next(data_iter) for _ in range(2)]
  unrolled, state_u = run_steps(config, batches, MESH, jax.devices())
  config.model.layers_mode = "grouped"
  grouped, state_g = run_steps(config, batches, MESH, jax.devices())

  np.testing.assert_allclose(grouped, unrolled, rtol=1e-5)
  w_gate = state_g["params"]["stacks"][0]["mlp"]["w_gate"][...]
  assert w_gate.shape == (2, *state_u["params"]["blocks"][0]["mlp"]["w_gate"].shape)
  assert w_gate.sharding.spec == PartitionSpec(None, "fsdp", "tensor")  # per layer as unrolled
  mu = state_g["opt_state"][1][0].mu["stacks"][0]["mlp"]["w_gate"][...]
  assert mu.shape == w_gate.shape and mu.sharding.spec == w_gate.sharding.spec
  jax.tree.map(
    lambda g, u: np.testing.assert_allclose(g, u, atol=1e-6, rtol=1e-5),
    lm.unstack_layers(state_g, GROUPS),
    state_u,
  )


def test_grouped_train_step_stacks_no_params(data_dir):
  """No concatenate in the step yields a stacked param's shape (stacking on the fly did)."""
  config = small_config(data_dir, "grouped")
  config.mesh.update(data=1, fsdp=1, tensor=1)
  run = state.setup(config, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  stacked = {
    "x".join(map(str, x.shape))
    for x in jax.tree.leaves(run.abstract_state["params"]["stacks"])
    if x.ndim > 1 and x.shape[0] == 2
  }
  assert stacked
  tokens = jax.ShapeDtypeStruct((8, 64), np.int32, sharding=run.batch_sharding)
  text = run.train_step.lower(run.abstract_state, dict(inputs=tokens, targets=tokens)).as_text()
  concatenated = set(re.findall(r"stablehlo\.concatenate .*-> tensor<([0-9x]+)x\w+>", text))
  assert not stacked & concatenated


def test_grouped_checkpoint_resumes_unrolled_and_back(tmp_path, capsys, data_dir, grouped_run):
  workdir = tmp_path / "switched"
  shutil.copytree(grouped_run, workdir)
  shutil.rmtree(workdir / "checkpoints" / str(STEPS))  # resume from the grouped step 3
  train.train(small_config(data_dir, "unrolled"), str(workdir))
  assert "resuming from step 3" in capsys.readouterr().out
  want, got = helpers.train_losses(grouped_run), helpers.train_losses(workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in got], [want[s] for s in got], rtol=1e-5)
  assert not os.path.exists(str(workdir / "checkpoints") + ".damaged")  # not taken for damage

  # The unrolled step 6 resumes grouped, as the grouped step 6 does.
  reference = tmp_path / "grouped"
  shutil.copytree(grouped_run, reference)
  for run_dir in (workdir, reference):
    train.train(small_config(data_dir, "grouped", steps=STEPS + 2), str(run_dir))
  want, got = helpers.train_losses(reference), helpers.train_losses(workdir)
  np.testing.assert_allclose([got[s] for s in (7, 8)], [want[s] for s in (7, 8)], rtol=1e-5)


def test_evaluate_restore_of_a_grouped_run_gives_per_layer_blocks(grouped_run):
  restored = restore.latest(str(grouped_run))
  assert restored.config.model.layers_mode == "unrolled" and len(restored.model.blocks) == 4
  row = evaluate.evaluate_workdir(str(grouped_run))
  final_eval = [r for r in read_metrics(grouped_run) if r.get("split") and r["step"] == STEPS]
  assert row["step"] == STEPS
  assert row["loss"] == pytest.approx(final_eval[0]["loss"], rel=1e-5)

  model = restored.model  # decodes with per-layer caches; stacked, it names the fix
  assert len(generate.generate_tokens(model, [[1, 2, 3]], max_new_tokens=3, eos_id=-1)[0]) == 3
  lm.set_layers_mode(model, "grouped")
  with pytest.raises(ConfigError, match="set_layers_mode"):
    generate.generate_tokens(model, [[1, 2, 3]], max_new_tokens=3)
