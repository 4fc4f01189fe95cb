"""Checkpoints and the workdir around them: damaged checkpoints (resuming falls back to an
older step and keeps the damaged one aside), restoring the params alone, and the workdir
files (tlm_jax/workdir.py)."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from tlm_jax import checkpoint, restore, sharding, state
from tlm_jax import workdir as workdir_lib
from tlm_jax.errors import ConfigError


def make_state(seed):
  w = jax.random.normal(jax.random.key(seed), (64, 32))
  return {"step": jnp.int32(seed), "params": {"w": w}}


def abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def batches():
  return iter(grain.MapDataset.range(100).batch(4))


def save_two_steps(directory):
  """Checkpoints at steps 2 and 4, one batch apart; returns the states saved."""
  ckpt, it, states = checkpoint.Checkpointer(directory, keep=3), batches(), {}
  for step in (2, 4):
    next(it)
    states[step] = make_state(step)
    ckpt.save(step, states[step], it)
  ckpt.close()
  return states


def damage(step_dir):
  """Truncates the array data files (OCDBT `d/` folders) to half their size."""
  count = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    if os.path.basename(root) == "d":
      for name in files:
        path = os.path.join(root, name)
        os.truncate(path, os.path.getsize(path) // 2)
        count += 1
  assert count


def warnings(err):
  return [line for line in err.splitlines() if line.startswith("warning: checkpoint")]


def test_damaged_latest_checkpoint_falls_back_and_is_moved_aside(tmp_path, capsys):
  directory = str(tmp_path / "checkpoints")
  states = save_two_steps(directory)
  damage(os.path.join(directory, "4"))

  ckpt, it = checkpoint.Checkpointer(directory, keep=3), batches()
  step, state = ckpt.restore_latest(abstract(states[2]), it)
  assert step == 2
  jax.tree.map(np.testing.assert_array_equal, state, states[2])
  np.testing.assert_array_equal(next(it), [4, 5, 6, 7])  # step 2 had used one batch

  [warning] = warnings(capsys.readouterr().err)
  assert f"checkpoint 4 in {directory}" in warning
  assert f"{directory}.damaged/4" in warning and "from step 2" in warning
  assert os.path.isfile(tmp_path / "checkpoints.damaged" / "4" / "state" / "_METADATA")
  assert ckpt.manager.all_steps() == [2]

  ckpt.save(4, make_state(5), it)  # the step number is free again
  ckpt.wait()
  step, state = ckpt.restore_latest(abstract(states[2]), batches())
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, state, make_state(5))
  assert not warnings(capsys.readouterr().err)
  ckpt.close()


def test_all_checkpoints_damaged_is_a_one_line_config_error(tmp_path, capsys):
  directory = str(tmp_path / "checkpoints")
  states = save_two_steps(directory)
  for step in (2, 4):
    damage(os.path.join(directory, str(step)))

  ckpt = checkpoint.Checkpointer(directory, keep=3)
  with pytest.raises(ConfigError) as single:
    ckpt.restore(4, abstract(states[4]))
  with pytest.raises(ConfigError) as latest:
    ckpt.restore_latest(abstract(states[4]), batches())
  for message in (str(single.value), str(latest.value)):
    assert "\n" not in message and directory in message and len(message) < 1000
  assert "step 4:" in str(latest.value) and "step 2:" in str(latest.value)
  # Likely the wrong config rather than bad files: nothing is moved.
  assert sorted(os.listdir(directory)) == ["2", "4"]
  assert not os.path.exists(directory + ".damaged")
  assert not warnings(capsys.readouterr().err)
  ckpt.close()


def test_no_checkpoint_restores_nothing(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), keep=3)
  assert ckpt.restore_latest(abstract(make_state(0)), batches()) == (None, None)
  ckpt.close()


def test_a_checkpoint_in_another_layout_is_converted_not_moved_aside(tmp_path):
  """The caller holds `w` as two stacked halves; the checkpoints hold it whole."""
  directory = str(tmp_path / "checkpoints")
  states = save_two_steps(directory)

  def halves(state):
    return {"step": state["step"], "params": {"halves": state["params"]["w"].reshape(2, 32, 32)}}

  def relayout(saved):
    return (abstract(states[4]), halves) if "w" in saved["params"] else None

  ckpt, it = checkpoint.Checkpointer(directory, keep=3), batches()
  step, state = ckpt.restore_latest(abstract(halves(states[4])), it, relayout)
  assert step == 4
  jax.tree.map(np.testing.assert_array_equal, state, halves(states[4]))
  np.testing.assert_array_equal(next(it), [8, 9, 10, 11])
  assert sorted(os.listdir(directory)) == ["2", "4"]
  ckpt.close()


# ---------------------------------------------------------------------------
# Restoring a workdir's params alone (tlm_jax.restore), for the tools that do not train.
# ---------------------------------------------------------------------------


def bytes_read() -> int:
  """Bytes this process has read from files so far (Linux /proc/self/io `rchar`)."""
  with open("/proc/self/io") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def saved_workdir(path, layers_mode):
  """A workdir as training leaves it (config.json; a checkpoint of the whole train state and
  the data position) without training: random params and Adam moments (zeros would compress
  to nothing on disk). Returns (config, the state saved)."""
  config = helpers.load_config("tlm_transformer", "tiny")
  config.model.layers_mode = layers_mode
  os.makedirs(path)
  workdir_lib.write_config(str(path), config)
  setup = state.setup(config, sharding.make_mesh(config.mesh))
  rng = np.random.default_rng(0)
  train_state = jax.tree.map(
    lambda x: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding),
    setup.abstract_state,
  )
  ckpt = checkpoint.Checkpointer(workdir_lib.path(str(path), workdir_lib.CHECKPOINTS), keep=3)
  ckpt.save(3, train_state, batches(), force=True)
  ckpt.close()
  return config, train_state


def full_restore(workdir, config):
  """The whole train state restored as a resumed run restores it (through state.relayout)."""
  mesh = sharding.make_mesh(config.mesh)
  setup = state.setup(config, mesh)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, workdir_lib.CHECKPOINTS), keep=3)
  step, train_state = ckpt.restore_latest(
    setup.abstract_state, relayout=state.relayout(config, mesh)
  )
  ckpt.close()
  return step, train_state


@pytest.mark.parametrize("saved_mode", ["unrolled", "grouped"])
def test_restore_reads_the_params_alone_and_equals_a_full_restore(tmp_path, saved_mode):
  workdir = str(tmp_path / "w")
  config, saved = saved_workdir(workdir, saved_mode)
  config.model.layers_mode = "unrolled"  # what restore.latest gives, whatever was saved

  before = bytes_read()
  step, whole = full_restore(workdir, config)
  whole_read = bytes_read() - before
  before = bytes_read()
  restored = restore.latest(workdir)
  params_read = bytes_read() - before

  assert restored.step == step == 3 and restored.config.model.layers_mode == "unrolled"
  assert len(restored.model.blocks) == config.model.num_layers
  jax.tree.map(np.testing.assert_array_equal, restored.params, whole["params"])
  params_bytes = sum(x.nbytes for x in jax.tree.leaves(saved["params"]))
  moment_bytes = sum(x.nbytes for x in jax.tree.leaves(saved["opt_state"]))
  assert moment_bytes > 1.9 * params_bytes  # AdamW: two moments per param
  # A full restore reads every array (and some metadata); restore.latest reads the params
  # (and the same metadata), not the moments: less than a quarter of them.
  assert whole_read > params_bytes + moment_bytes
  assert params_read < params_bytes + moment_bytes / 4


# ---------------------------------------------------------------------------
# The workdir's files (tlm_jax/workdir.py).
# ---------------------------------------------------------------------------


def test_metrics_rows_survive_a_write_cut_short(tmp_path):
  workdir = str(tmp_path)
  assert workdir_lib.read_metrics(workdir) == []  # before the first row
  workdir_lib.append_metrics(workdir, dict(step=1, loss=3.0))
  with open(workdir_lib.path(workdir, workdir_lib.METRICS), "a") as f:
    f.write('{"step": 2, "lo')  # killed mid-write (or being written as we read)
  assert workdir_lib.read_metrics(workdir) == [dict(step=1, loss=3.0)]
  workdir_lib.append_metrics(workdir, dict(step=2, loss=2.5))  # the resumed run
  workdir_lib.append_metrics(workdir, dict(step=2, split="validation", loss=2.7))
  assert workdir_lib.training_rows(workdir) == [dict(step=1, loss=3.0), dict(step=2, loss=2.5)]
  assert len(workdir_lib.read_metrics(workdir)) == 3


def test_evaluations_and_task_results_by_step(tmp_path):
  workdir = str(tmp_path)
  workdir_lib.append_metrics(workdir, dict(step=4, split="validation", loss=2.0))
  workdir_lib.append_metrics(workdir, dict(step=4, split="task:piqa", acc=0.5))
  workdir_lib.write_evaluation(workdir, dict(step=4, split="validation", loss=9.0))
  workdir_lib.write_evaluation(workdir, dict(step=6, split="validation", loss=1.5))
  workdir_lib.write_evaluation(workdir, dict(step=6, split="test", loss=1.0))
  # Training's own row wins at a step it evaluated; the CLI's file fills in the others.
  assert {s: r["loss"] for s, r in workdir_lib.evaluations(workdir, "validation").items()} == {
    4: 2.0,
    6: 1.5,
  }
  assert workdir_lib.latest_tasks(workdir) is None
  workdir_lib.write_tasks(workdir, 10, dict(piqa=dict(acc=0.5)))
  workdir_lib.write_tasks(workdir, 9, dict(piqa=dict(acc=0.1)))
  workdir_lib.write_tasks(workdir, 10, dict(arc_easy=dict(acc=0.6)))  # merged, piqa kept
  assert workdir_lib.latest_tasks(workdir) == dict(piqa=dict(acc=0.5), arc_easy=dict(acc=0.6))


def test_config_and_widths_round_trip(tmp_path):
  workdir = str(tmp_path)
  assert not workdir_lib.is_workdir(workdir) and workdir_lib.read_widths(workdir) is None
  config = helpers.load_config("tlm_transformer", "tiny")
  workdir_lib.write_config(workdir, config)
  workdir_lib.write_widths(workdir, [384, 128])
  assert workdir_lib.is_workdir(workdir)
  assert workdir_lib.read_config(workdir) == config
  assert workdir_lib.read_widths(workdir) == [384, 128]
  with pytest.raises(ConfigError, match="config.json"):
    workdir_lib.read_config(str(tmp_path / "elsewhere"))
