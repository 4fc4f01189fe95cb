"""Damaged checkpoints: resuming falls back to an older step and keeps the damaged one aside."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlm_jax import checkpoint
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
