"""The analyses on an X-shaped model: blocks at their own residual widths, resized between
sublayers as the decoder resizes between blocks (tlm_jax/analysis/blocks.py)."""

import functools
import json
import math
import pathlib

import jax
import numpy as np
import pytest

import helpers
from tlm_jax import restore, train
from tlm_jax.analysis import alignment, blocks, hyperfit, load, looping, lora, swap_kl
from tlm_jax.model import lm

RESIDUAL_WIDTHS = [80, 32, 32, 80]


@pytest.fixture(scope="module")
def run(tmp_path_factory, builtin_data_dir):
  """configs/xformer.py:tiny trained one step, restored on one device."""
  config = helpers.load_config("xformer", "tiny")
  config.train.update(steps=1, batch_size=8, seq_len=32, warmup_steps=0, eval_batches=1)
  config.data.data_dir = str(builtin_data_dir)
  workdir = tmp_path_factory.mktemp("xshape")
  train.train(config, str(workdir))
  run = restore.latest(str(workdir), jax.devices()[:1])
  assert run.step == 1 and list(run.model.residual_widths) == RESIDUAL_WIDTHS
  return run


@pytest.fixture(scope="module")
def batches(run):
  return load.validation_batches(run.config, 1, 2)


def stream_reference(model, tokens_BT, mixers, mlps):
  """Logits of a plan computed the decoder's way: a stream of varying width, each sublayer
  reading and writing it at its own layer's residual width (lm.read_width / write_width)."""
  positions_BT = blocks.positions_like(tokens_BT)
  stream = model.embed_tokens(tokens_BT)
  for m, f in zip(mixers, mlps):
    block, width = model.blocks[m], model.residual_widths[m]
    x = lm.read_width(stream, width)
    stream = lm.write_width(stream, x + blocks.mixer_update(block, x, positions_BT))
    block, width = model.blocks[f], model.residual_widths[f]
    x = lm.read_width(stream, width)
    stream = lm.write_width(stream, x + blocks.mlp_update(block, x))
  return model.unembed(model.final_norm(lm.read_width(stream, model.residual_widths[-1])))


def test_the_runner_is_the_decoder_and_swaps_resize_like_it(run, batches):
  model, x = run.model, batches[0]["inputs"]
  n = len(model.blocks)
  own = np.asarray(blocks.jit_method(model, lm.Decoder.__call__)(x))
  plan = blocks.jit_method(model, blocks.plan_logits)
  np.testing.assert_allclose(plan(x, *swap_kl.identity(n)), own, atol=1e-6)
  looped = blocks.jit_method(model, functools.partial(looping.looped_logits, size=2))
  for variant in looping.VARIANTS:
    np.testing.assert_allclose(looped(x, 1, *looping.variant_args(variant, 1)), own, atol=1e-6)
  # Layers 0 (80 wide) and 2 (32 wide) trade places: whole blocks, or only their mixers.
  for mode in swap_kl.MODES:
    mixers, mlps = swap_kl.interchanged(n, 0, 2, mode)
    swapped = np.asarray(plan(x, mixers, mlps))
    reference = functools.partial(stream_reference, mixers=mixers.tolist(), mlps=mlps.tolist())
    want = blocks.jit_method(model, reference)(x)
    np.testing.assert_allclose(swapped, want, atol=1e-5)
    assert not np.allclose(swapped, own, atol=1e-3)


def written(run, name, result, fig):
  """What the CLI writes for `result`, read back from the workdir."""
  load.write_json(run.workdir, name, result)
  load.save_figure(fig, run.workdir, name)
  assert (pathlib.Path(run.workdir) / f"analysis_{name}.png").stat().st_size > 10_000, name
  saved = json.loads((pathlib.Path(run.workdir) / f"analysis_{name}.json").read_text())
  assert saved["residual_widths"] == RESIDUAL_WIDTHS and saved["step"] == 1
  return saved


def numbers(tree):
  return np.array([v for v in jax.tree.leaves(tree) if isinstance(v, float)])


def test_alignment(run):
  result = alignment.analyze(run, 1, 2)
  saved = written(run, "alignment", result, alignment.plot([result]))
  assert [r["residual_width"] for r in saved["layers"]] == RESIDUAL_WIDTHS
  assert np.isfinite(numbers(saved["layers"])).all()
  for row in saved["layers"]:
    for sublayer in alignment.SUBLAYERS:
      assert abs(row[sublayer]["cosine_mean"]) <= 1 and row[sublayer]["relative_norm_mean"] > 0


def test_swap_kl(run):
  result = swap_kl.analyze(run, 1, 2, max_remove=1, random_trials=1, seed=0)
  saved = written(run, "swap_kl", result, swap_kl.plot(result))
  for mode in swap_kl.MODES:
    for protocol in swap_kl.PROTOCOLS:
      matrix = np.array(saved["modes"][mode][protocol])
      assert matrix.shape == (4, 4) and np.isfinite(matrix).all()
      assert np.all(np.diag(matrix) == 0) and np.all(matrix[~np.eye(4, dtype=bool)] > 0)
  curves = [c["perplexity"] for m in saved["pruning"]["kl_guided"].values() for c in m.values()]
  assert all(c[0] == saved["perplexity"] and np.isfinite(c).all() for c in curves)


def test_looping(run):
  result = looping.analyze(run, 1, 2, max_loops=2, position_loops=2)
  saved = written(run, "looping", result, looping.plot(result))
  assert saved["window"]["size"] == 1 and saved["by_loops"]["loops"] == [1, 2]
  assert [saved["by_loops"][v][0] for v in looping.VARIANTS] == [saved["perplexity"]] * 3
  assert all(len(saved["by_position"][v]) == 4 for v in looping.VARIANTS)
  assert np.isfinite(numbers(saved)).all()


def test_hyperfit(run, tmp_path):
  data = tmp_path / "small.txt"
  data.write_text("".join(f"sample {i}: the quick brown fox jumps\n" for i in range(6)))
  settings = lora.Settings(layers=2, rank=2, epochs=1, batch_size=4)
  result = hyperfit.analyze(run, str(data), settings, heldout=2, prompt_tokens=4, new_tokens=4)
  saved = written(run, "hyperfit", result, hyperfit.plot(result))
  assert saved["layers"] == [2, 3] and saved["train_samples"] == 4
  ratios = saved["participation_ratio"]
  for name in ("base", "hyperfit"):
    # Each between 1 and its block's residual width.
    assert all(1 <= r <= d for r, d in zip(ratios[name], RESIDUAL_WIDTHS)), ratios[name]
  assert ratios["hyperfit"][:2] == ratios["base"][:2]  # nothing changes before the adapters
  assert saved["generation"]["base"]["top1_agreement"] == 1.0
  assert math.isfinite(saved["train_loss"]["after"])
