"""The trainer end to end: sharding equivalence, preemption and resume, multi-process, errors.

One trainer subprocess (`uninterrupted`) is the reference the others match; a test starts a
process of its own only where the process is what it tests (SIGTERM, two processes, the
console, exit statuses); everything else calls train.train in-process."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import helpers
from helpers import run_steps
from tlm_jax import checkpoint, evaluate, sharding, state, train
from tlm_jax import config as config_lib
from tlm_jax.data import pipeline
from tlm_jax.errors import ConfigError
from tlm_jax.workdir import read_metrics

REPO = str(helpers.REPO)
local = helpers.load_module("launch/local.py")

STEPS = 24
# A small tapered model, fast on CPU; overrides of configs/demo.py.
SMALL = dict(
  **{"model.d_model": 64, "model.mlp_width": 256, "model.num_heads": 4},
  **{
    "train.batch_size": 8,
    "train.seq_len": 64,
    "train.steps": STEPS,
    "train.warmup_steps": 4,
    "train.log_every": 1,
    "train.eval_every": 12,
    "train.eval_batches": 2,
    "train.checkpoint_every": 12,
  },
)


def load_demo_config(data_dir, **overrides):
  config = helpers.load_config("demo")
  for key, value in {**SMALL, "data.data_dir": str(data_dir), **overrides}.items():
    section, field = key.split(".")
    config[section][field] = value
  return config


def train_args(workdir, data_dir, **overrides):
  values = {**SMALL, "data.data_dir": str(data_dir), **overrides}
  return [
    "--config",
    os.path.join(REPO, "configs/demo.py"),
    "--workdir",
    str(workdir),
    *[f"--config.{k}={v}" for k, v in values.items()],
  ]


def train_in_process(workdir, data_dir, **overrides):
  """What `python -m tlm_jax.train` with these overrides does, without a new process."""
  return train.train(load_demo_config(data_dir, **overrides), str(workdir))


def run_train(workdir, data_dir, **overrides):
  return subprocess.run(
    [sys.executable, "-m", "tlm_jax.train", *train_args(workdir, data_dir, **overrides)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )


def restore_params(workdir, config, mesh):
  abstract = state.setup(config, mesh).abstract_state
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), 3)
  restored = ckpt.restore(ckpt.latest_step(), abstract)
  ckpt.close()
  return restored


@pytest.fixture(scope="module")
def data_dir(builtin_data_dir):
  return builtin_data_dir


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = run_train(workdir, data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  (workdir.parent / "uninterrupted.stderr").write_text(result.stderr)
  return workdir


def test_sharded_steps_match_one_device(data_dir):
  config = load_demo_config(data_dir)
  batches = [next(it) for it in [pipeline.make_iterator(config, "train")] for _ in range(3)]

  one, state_one = run_steps(config, batches, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  eight, state_eight = run_steps(config, batches, dict(data=2, fsdp=2, tensor=2), jax.devices())
  np.testing.assert_allclose(eight, one, rtol=1e-4)
  assert one[-1] < one[0]
  w = state_eight["params"]["blocks"][0]["mlp"]["w_gate"][...]
  assert w.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_allclose(w, state_one["params"]["blocks"][0]["mlp"]["w_gate"][...], atol=1e-5)


def test_gradient_accumulation_matches_one_big_batch(data_dir):
  config = load_demo_config(data_dir)
  batch = next(pipeline.make_iterator(config, "train"))
  out = []
  for accum in (1, 2):
    config.train.grad_accum = accum
    # 4 devices: each of the 2 microbatches (4 rows) still splits over the batch axes.
    losses, final = run_steps(config, [batch], dict(data=-1, fsdp=1, tensor=1), jax.devices()[:4])
    out.append((losses[0], final["params"]["embed"][...]))
  assert out[0][0] == pytest.approx(out[1][0], rel=1e-5)
  np.testing.assert_allclose(out[0][1], out[1][1], atol=1e-6)


def test_workdir_contract(uninterrupted):
  for name in ("config.json", "widths.json", "metrics.jsonl"):
    assert os.path.exists(uninterrupted / name)
  assert json.loads((uninterrupted / "widths.json").read_text()) == [384, 320, 192, 128]
  rows = read_metrics(uninterrupted)
  train_rows = [r for r in rows if "split" not in r]
  assert {"step", "loss", "learning_rate", "tokens_seen", "tokens_per_sec", "mfu"} <= set(
    train_rows[0]
  )
  assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))
  evals = [r for r in rows if r.get("split") == "validation"]
  assert [r["step"] for r in evals] == [12, 24]
  assert {"loss", "perplexity", "bits_per_byte"} <= set(evals[0])
  assert evals[1]["loss"] < evals[0]["loss"]
  assert os.listdir(uninterrupted / "tensorboard")
  assert sorted(os.listdir(uninterrupted / "checkpoints")) == ["12", "24"]


def test_sigterm_then_same_command_matches_uninterrupted(tmp_path, capsys, data_dir, uninterrupted):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
    [sys.executable, "-m", "tlm_jax.train", *train_args(workdir, data_dir)],
    cwd=REPO,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  deadline = time.time() + 300
  while not (workdir / "metrics.jsonl").exists() or len(helpers.train_losses(workdir)) < 3:
    assert proc.poll() is None and time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  output = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0, output[-3000:]
  assert "preempted at step" in output
  stopped = checkpoint.Checkpointer(str(workdir / "checkpoints"), 3).latest_step()
  assert 3 <= stopped < STEPS

  train_in_process(workdir, data_dir)  # the same config, resumed
  assert f"resuming from step {stopped}" in capsys.readouterr().out
  want, got = helpers.train_losses(uninterrupted), helpers.train_losses(workdir)
  assert got[STEPS] == want[STEPS]
  assert all(got[s] == want[s] for s in range(stopped + 1, STEPS + 1))

  config = load_demo_config(data_dir)
  mesh = sharding.make_mesh(config.mesh)
  a, b = restore_params(uninterrupted, config, mesh), restore_params(workdir, config, mesh)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_checkpoint_restores_onto_another_mesh(data_dir, uninterrupted):
  config = load_demo_config(data_dir)
  written = restore_params(uninterrupted, config, sharding.make_mesh(config.mesh))
  config.mesh.update(data=2, fsdp=2, tensor=2)
  moved = restore_params(uninterrupted, config, sharding.make_mesh(config.mesh))
  w = moved["params"]["blocks"][1]["mlp"]["w_down"][...]
  assert w.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  for x, y in zip(jax.tree.leaves(written), jax.tree.leaves(moved)):
    np.testing.assert_array_equal(x, y)


def test_raising_steps_continues_a_finished_run(tmp_path, data_dir, uninterrupted):
  workdir = tmp_path / "continued"
  shutil.copytree(uninterrupted, workdir)
  assert train_in_process(workdir, data_dir, **{"train.steps": STEPS + 4})["step"] == STEPS + 4
  assert max(helpers.train_losses(workdir)) == STEPS + 4


def test_two_processes_match_one(tmp_path, data_dir, uninterrupted):
  workdir = tmp_path / "two"
  code = local.launch(2, 4, train_args(workdir, data_dir))
  assert code == 0, (workdir / "process_1.log").read_text()[-3000:]
  want, got = helpers.train_losses(uninterrupted), helpers.train_losses(workdir)
  assert sorted(got) == sorted(want)
  np.testing.assert_allclose(
    [got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=1e-4
  )


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(
  tmp_path, data_dir, uninterrupted
):
  workdir = tmp_path / "nan"
  shutil.copytree(uninterrupted, workdir)
  overrides = {"train.steps": STEPS + 6, "train.learning_rate": 1e30}
  with pytest.raises(FloatingPointError) as stopped:  # uncaught by the CLI: a traceback, exit 1
    train_in_process(workdir, data_dir, **overrides, **{"train.checkpoint_every": 1000})
  assert "non-finite" in str(stopped.value)
  assert f"last good checkpoint is step {STEPS}" in str(stopped.value)
  assert checkpoint.Checkpointer(str(workdir / "checkpoints"), 3).latest_step() == STEPS


def test_bad_inputs_fail_early_with_the_field(tmp_path, data_dir):
  with pytest.raises(ConfigError, match="mesh.*needs 12 devices but 8"):
    sharding.make_mesh(dict(data=3, fsdp=2, tensor=2))
  with pytest.raises(ConfigError, match="train.batch_size=6"):
    sharding.check_batch(6, sharding.make_mesh(dict(data=-1, fsdp=1, tensor=1)))
  # ConfigErrors; test_a_bad_train_value_is_one_line_with_exit_status_2 runs the CLI on one.
  with pytest.raises(ConfigError, match="data.name"):
    train_in_process(tmp_path / "w", data_dir, **{"data.source": "tfds", "data.name": "no_such"})
  (tmp_path / "file_not_dir").write_text("")
  with pytest.raises(ConfigError, match="checkpoint directory"):
    checkpoint.Checkpointer(str(tmp_path / "file_not_dir"), 1)
  with pytest.raises(ConfigError, match="train.batch_size=6"):
    train_in_process(tmp_path / "w2", data_dir, **{"train.batch_size": 6})


def test_evaluate_cli_reports_the_latest_checkpoint(uninterrupted):
  result = subprocess.run(
    [sys.executable, "-m", "tlm_jax.evaluate", "--workdir", str(uninterrupted)],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  row = json.loads(result.stdout.strip().splitlines()[-1])
  assert row["step"] == STEPS and row["split"] == "validation"
  final_eval = [r for r in read_metrics(uninterrupted) if r.get("split")][-1]
  assert row["loss"] == pytest.approx(final_eval["loss"], rel=1e-6)
  assert row["perplexity"] == pytest.approx(np.exp(row["loss"]))
  assert 0 < row["unigram_bits_per_byte"] < 8 and row["bits_per_byte"] > 0
  assert json.loads((uninterrupted / f"eval_validation_{STEPS}.json").read_text()) == row


ABSL_INFO = re.compile(r"^I\d{4} ", re.MULTILINE)  # absl's INFO prefix, e.g. I1125 16:40:43.58


def test_console_is_quiet_and_plain_in_a_log_file(uninterrupted):
  stderr = (uninterrupted.parent / "uninterrupted.stderr").read_text()
  assert not ABSL_INFO.search(stderr), stderr[:2000]
  assert "\r" not in stderr  # no carriage-return redraws in a file
  progress = [line for line in stderr.splitlines() if line.startswith("step ")]
  assert progress[0].startswith("step 1/24 loss ") and progress[-1].startswith("step 24/24 ")


def test_verbosity_flag_brings_the_library_logs_back(uninterrupted):
  cmd = [sys.executable, "-m", "tlm_jax.evaluate", "--workdir", str(uninterrupted)]
  loud = subprocess.run(
    [*cmd, "--verbosity=1"], cwd=REPO, capture_output=True, text=True, timeout=300
  )
  assert loud.returncode == 0, loud.stderr[-3000:]
  assert ABSL_INFO.search(loud.stderr)


@pytest.mark.parametrize("field, value", [("learning_rate", -1), ("seq_len", 0), ("batch_size", 0)])
def test_bad_train_values_are_one_line_errors(tmp_path, data_dir, field, value):
  with pytest.raises(ConfigError) as error:
    train_in_process(tmp_path / "w", data_dir, **{f"train.{field}": value})
  assert str(error.value).startswith(f"train.{field}={value}")
  assert "\n" not in str(error.value)
  assert not (tmp_path / "w" / "checkpoints").exists()  # stopped before anything ran


def test_a_bad_train_value_is_one_line_with_exit_status_2(tmp_path, data_dir):
  """The CLI prints a ConfigError (any of them) as its only line and exits 2."""
  result = run_train(tmp_path / "w", data_dir, **{"train.learning_rate": -1})
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: train.learning_rate=-1")
  assert len(result.stderr.strip().splitlines()) == 1, result.stderr
  assert not (tmp_path / "w" / "checkpoints").exists()


def test_truncated_latest_checkpoint_resumes_from_the_previous_one(
  tmp_path, capsys, data_dir, uninterrupted
):
  workdir = tmp_path / "damaged"
  shutil.copytree(uninterrupted, workdir)
  data_files = [
    f for f in (workdir / "checkpoints" / str(STEPS)).rglob("*") if f.parent.name == "d"
  ]
  assert data_files
  for f in data_files:
    os.truncate(f, f.stat().st_size // 2)
  train_in_process(workdir, data_dir)
  out, err = capsys.readouterr()
  assert f"warning: checkpoint {STEPS} in" in err
  assert "resuming from step 12" in out
  assert (workdir / "checkpoints.damaged" / str(STEPS)).is_dir()  # kept, not deleted
  want, got = helpers.train_losses(uninterrupted), helpers.train_losses(workdir)
  assert got[STEPS] == want[STEPS]


def test_a_workdir_of_the_first_config_format_evaluates_and_resumes(tmp_path, data_dir):
  """tests/fixtures/config_v1.json was written by the trainer before the typed spec."""
  old = config_lib.from_json(str(helpers.REPO / "tests" / "fixtures" / "config_v1.json"))
  old.data.data_dir = str(data_dir)
  workdir = tmp_path / "v1"
  train.train(old, str(workdir))
  shutil.copy(helpers.REPO / "tests" / "fixtures" / "config_v1.json", workdir / "config.json")
  with open(workdir / "config.json") as f:
    saved = json.load(f)
  saved["data"]["data_dir"] = str(data_dir)
  (workdir / "config.json").write_text(json.dumps(saved))
  row = evaluate.evaluate_workdir(str(workdir))
  assert row["step"] == old.train.steps and math.isfinite(row["loss"])
  resumed = config_lib.from_json(str(workdir / "config.json"))
  resumed.train.steps += 2
  assert train.train(resumed, str(workdir))["step"] == old.train.steps + 2


def test_a_nan_stop_gives_the_signal_handlers_back(tmp_path, data_dir):
  def mine(signum, frame):
    del signum, frame

  previous = signal.signal(signal.SIGTERM, mine)
  try:
    config = load_demo_config(data_dir)
    config.train.update(steps=4, warmup_steps=1, log_every=2, learning_rate=1e30)
    with pytest.raises(FloatingPointError, match="there is no checkpoint yet"):
      train.train(config, str(tmp_path / "nan"))
    assert signal.getsignal(signal.SIGTERM) is mine
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_prefetching_changes_no_numbers(tmp_path, data_dir, uninterrupted):
  workdir = tmp_path / "no_prefetch"
  train_in_process(workdir, data_dir, **{"train.prefetch": 0})
  assert helpers.train_losses(workdir) == helpers.train_losses(uninterrupted)
  config = load_demo_config(data_dir)
  mesh = sharding.make_mesh(config.mesh)
  a, b = restore_params(uninterrupted, config, mesh), restore_params(workdir, config, mesh)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
