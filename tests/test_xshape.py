"""The X-shaped residual stream: resizing, budget, modes, sharding, checkpoints (its training
test is test_backbones.py::test_trains_on_the_builtin_corpus_with_falling_validation_loss)."""

import itertools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from helpers import forward, run_steps
from tlm_jax import checkpoint, sharding, state, taper
from tlm_jax.data import pipeline
from tlm_jax.model import lm


def xformer(arg="tiny", backbone="transformer"):
  config = helpers.load_config("xformer", arg)
  config.model.backbone = backbone
  if backbone == "hope_attention":
    config.model.hope.update(chunk_sizes=(8, 16, 0), level_tile=8)
    config.model.taper.tile = 32
  return config


def test_narrow_then_widen_restores_the_most_recent_wider_state_and_zeros_beyond():
  embed = jnp.arange(1.0, 5.0).reshape(1, 1, 4)  # the stream starts 4 wide
  stream = embed
  narrow = lm.read_width(stream, 2)
  np.testing.assert_array_equal(narrow, [[[1.0, 2.0]]])
  stream = lm.write_width(stream, narrow * 10)  # a block at width 2 wrote its 2 coordinates
  wide = lm.read_width(stream, 6)
  # Coordinates 0-1 from the narrow block, 2-3 from the most recent state that had them
  # (the embedding), 4-5 never existed: zeros.
  np.testing.assert_array_equal(wide, [[[10.0, 20.0, 3.0, 4.0, 0.0, 0.0]]])
  stream = lm.write_width(stream, wide + 1)
  np.testing.assert_array_equal(lm.read_width(stream, 3), [[[11.0, 21.0, 4.0]]])


@pytest.mark.parametrize("backbone", ["transformer", "hope_attention"])
def test_causal(backbone):
  model = state.build_model(xformer(backbone=backbone))
  assert len(set(model.residual_widths)) > 1
  tokens = jax.random.randint(jax.random.key(0), (1, 32), 0, 256)

  def last_loss(embedded):
    logits = model.unembed(model.trunk(embedded))
    return logits[0, 15].sum()

  grad = jax.jit(jax.grad(last_loss))(model.embed_tokens(tokens))  # eagerly: 2-5x the CPU
  assert float(jnp.abs(grad[0, :16]).sum()) > 0
  assert float(jnp.abs(grad[0, 16:]).max()) == 0.0


def test_unrolled_equals_grouped():
  config = xformer("tiny,uniform")
  config.model.residual.update(schedule="custom", widths=(64, 32, 32, 64))
  model = state.build_model(config)
  assert model.residual_widths == (64, 32, 32, 64) and model.widths[1] == model.widths[2]
  tokens = jax.random.randint(jax.random.key(1), (2, 32), 0, 256)
  unrolled = forward(model, tokens)
  lm.set_layers_mode(model, "grouped")
  assert model.groups == ((0,), (1, 2), (3,))
  np.testing.assert_allclose(forward(model, tokens), unrolled, atol=1e-5)


def test_budget_matches_the_uniform_twin_with_fewer_flops_and_kv_bytes():
  for scale in ("440m", "760m", "1.3b"):
    result = subprocess.run(
      [sys.executable, "-m", "tlm_jax.taper", "--config", f"configs/xformer.py:{scale}", "--json"],
      cwd=helpers.REPO,
      capture_output=True,
      text=True,
      timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert abs(report["total_params"] / report["uniform_total_params"] - 1) < 0.005, scale
    assert report["flops_per_token"] < report["uniform_flops_per_token"], scale
    assert report["kv_cache_bytes_per_token"] < report["uniform_kv_cache_bytes_per_token"], scale
    widths = report["residual_widths"]
    assert widths[0] > widths[len(widths) // 2] < widths[-1], scale


def test_built_params_equal_the_costed_params():
  for arg in ("tiny", "tiny,cosine"):
    config = xformer(arg)
    from_costs = taper.parity_report(config)["total_params"]
    model = nnx.eval_shape(lambda config=config: state.build_model(config))
    assert lm.param_count(model) == from_costs


@pytest.mark.parametrize("backbone", ["transformer", "hope_attention"])
def test_eight_devices_match_one_and_checkpoints_round_trip(backbone, tmp_path, builtin_data_dir):
  config = xformer(backbone=backbone)
  config.model.num_layers = 3  # residual widths 80, 32, 80: still an X, 3/4 of the compile
  config.train.update(batch_size=8, seq_len=32, steps=10, warmup_steps=2)
  config.data.data_dir = str(builtin_data_dir)
  batches = list(itertools.islice(pipeline.make_iterator(config, "train"), 2))
  eight, trained = run_steps(config, batches, dict(data=2, fsdp=2, tensor=2), jax.devices())
  one, _ = run_steps(config, batches, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  np.testing.assert_allclose(eight, one, rtol=1e-4)

  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), 1)
  data_iter = pipeline.make_iterator(config, "train")
  ckpt.save(2, trained, data_iter, force=True)
  ckpt.wait()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])  # written on 8, read on 1
  abstract = state.setup(config, mesh).abstract_state
  step, restored = ckpt.restore_latest(abstract)
  ckpt.close()
  assert step == 2
  for a, b in zip(jax.tree.leaves(trained), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(a, b)


def test_aot_compiles_for_a_tpu_topology():
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "tlm_jax.aot",
      "--config",
      "configs/xformer.py:tiny,cosine",
      "--topology",
      "v5e:2x4",
      "--config.mesh.fsdp=2",
      "--config.mesh.tensor=2",
    ],
    cwd=helpers.REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert json.loads(result.stdout)["fits"] is True
