"""Hope-attention's CMS levels against a token-by-token reference, its precision, level split,
and training at the learning rate the other backbones take."""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from tlm_jax import config as config_lib
from tlm_jax import state, taper
from tlm_jax.data import pipeline
from tlm_jax.model import costs, hope


def level_inputs(length=24, dim=8, width=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  weights = (
    0.3 * jax.random.normal(keys[0], (dim, width)),
    0.3 * jax.random.normal(keys[1], (dim, width)),
    0.3 * jax.random.normal(keys[2], (width, dim)),
  )
  w_value = jax.random.normal(keys[3], (dim, dim)) / np.sqrt(dim)
  return weights, w_value, jax.random.normal(keys[4], (length, dim))


def reference(weights, w_value, u, chunk_size, lr, max_step=0.0):
  """Token by token: every chunk_size tokens, one step of lr x the gradient of the finished
  chunk's summed loss, each matrix's step cut to max_step x its norm (when max_step > 0)."""
  outputs = []
  for t in range(u.shape[0]):
    if t and t % chunk_size == 0:
      grads = jax.grad(hope.associative_loss)(weights, u[t - chunk_size : t], w_value)
      steps = [lr * g for g in grads]
      if max_step:
        steps = [
          s * min(1.0, max_step * float(jnp.linalg.norm(w) / jnp.linalg.norm(s)))
          for w, s in zip(weights, steps)
        ]
      weights = tuple(w - s for w, s in zip(weights, steps))
    outputs.append(hope.swiglu(weights, u[t]))
  return jnp.stack(outputs)


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 10, 24])  # 10: 24 tokens end in part of one
@pytest.mark.parametrize("max_step", [0.0, 0.02])
def test_level_equals_the_sequential_rule(chunk_size, max_step):
  weights, w_value, u = level_inputs()
  y, _ = hope.in_context_level(weights, w_value, u, chunk_size, 0.01, max_step)
  want = reference(weights, w_value, u, chunk_size, 0.01, max_step)
  np.testing.assert_allclose(y, want, atol=1e-5)
  if max_step and chunk_size < 24:  # the trust region binds here, so it is tested
    assert not np.allclose(y, reference(weights, w_value, u, chunk_size, 0.01), atol=1e-3)


def test_an_update_sums_its_chunk_so_the_step_does_not_shrink_with_chunk_size():
  weights, w_value, u = level_inputs(length=4)
  twice = jnp.concatenate([u, u])  # the same 4 tokens twice: one chunk of 8
  short = hope.weights_per_chunk(weights, w_value, jnp.concatenate([u, u]), 4, 0.01)
  long = hope.weights_per_chunk(weights, w_value, jnp.concatenate([twice, twice]), 8, 0.01)
  for w0, s, l in zip(weights, short, long):
    np.testing.assert_allclose(l[1] - w0, 2 * (s[1] - w0), rtol=1e-4, atol=1e-7)


def test_weights_change_only_at_multiples_of_the_chunk_size():
  weights, w_value, u = level_inputs()
  used = hope.weights_per_chunk(weights, w_value, u, 8, 0.01)
  assert used[0].shape[0] == 3  # one set of weights per chunk of 8 tokens
  for w0, chunks in zip(weights, used):
    np.testing.assert_array_equal(chunks[0], w0)
    assert all(not np.allclose(chunks[j], chunks[j + 1]) for j in range(2))
  # Tokens inside a chunk see the same weights: changing a later token of
  # the chunk leaves earlier tokens' outputs alone, and no token sees its own chunk.
  y, _ = hope.in_context_level(weights, w_value, u, 8, 0.01)
  y2, _ = hope.in_context_level(weights, w_value, u.at[13].add(5.0), 8, 0.01)
  np.testing.assert_allclose(y2[:13], y[:13], atol=1e-6)
  np.testing.assert_allclose(y2[14:16], y[14:16], atol=1e-6)
  assert not np.allclose(y2[16:], y[16:], atol=1e-4)


def test_the_trust_region_bounds_every_update_however_large_the_step():
  weights, w_value, u = level_inputs()
  y, _ = hope.in_context_level(weights, w_value, 10 * u, 4, 100.0, 0.1)
  used = hope.weights_per_chunk(weights, w_value, 10 * u, 4, 100.0, 0.1)
  assert jnp.all(jnp.isfinite(y))
  for chunks in used:
    moved = jnp.linalg.norm(chunks[1:] - chunks[:-1], axis=(1, 2))
    np.testing.assert_array_less(moved, 0.1 * jnp.linalg.norm(chunks[:-1], axis=(1, 2)) + 1e-5)


def test_outer_gradients_reach_the_start_weights_and_value_map():
  weights, w_value, u = level_inputs()
  objective = lambda w, v: jnp.sum(hope.in_context_level(w, v, u, 8, 0.01, 0.1)[0] ** 2)
  grads = jax.grad(objective, argnums=(0, 1))(weights, w_value)
  for g in jax.tree.leaves(grads):
    assert jnp.all(jnp.isfinite(g)) and jnp.abs(g).sum() > 0


def test_levels_compute_in_the_model_dtype_and_carry_float32_weights():
  weights, w_value, u = level_inputs()
  y32, _ = hope.in_context_level(weights, w_value, u, 8, 0.01, 0.1)
  y16, last = hope.in_context_level(weights, w_value, u.astype(jnp.bfloat16), 8, 0.01, 0.1)
  assert y16.dtype == jnp.bfloat16 and all(w.dtype == jnp.float32 for w in last)
  np.testing.assert_allclose(y16.astype(jnp.float32), y32, atol=0.05 * float(jnp.abs(y32).max()))
  cfg = helpers.load_config("tlm_hope_attention", "tiny")
  cfg.model.dtype = "bfloat16"
  cms = hope.CMS(config_lib.model_spec(cfg), 128, rngs=nnx.Rngs(0))
  out = jax.jit(lambda x: cms(x))(jnp.ones((1, 16, cfg.model.d_model), jnp.bfloat16))
  assert out.dtype == jnp.bfloat16 and jnp.all(jnp.isfinite(out.astype(jnp.float32)))


def test_the_level_split_keeps_the_taper_tile_and_gives_the_rest_to_the_slow_level():
  spec = config_lib.model_spec(helpers.load_config("tlm_hope_attention", "760m"))
  for tiles in range(3, 80):
    split = costs.level_widths(spec, 128 * tiles)
    assert sum(split) == 128 * tiles and all(w % 128 == 0 and w > 0 for w in split)
    assert all(abs(w - 128 * tiles / 4) <= 128 for w in split[:2])  # about a quarter each
  for scale in ("tiny", "440m", "760m", "1.3b"):
    for preset in ("cosine", "linear", "sigmoid", "reverse"):  # antisymmetric: exact FLOPs
      cfg = helpers.load_config("tlm_hope_attention", f"{scale},{preset}")
      assert cfg.model.taper.tile == cfg.model.hope.level_tile
      report = taper.parity_report(cfg)
      assert report["param_difference"] == 0
      assert report["flops_per_token"] == report["uniform_flops_per_token"], (scale, preset)
    widths = taper.widths_from_config(helpers.load_config("tlm_hope_attention", scale))
    assert any(w % (4 * cfg.model.taper.tile) for w in widths)  # steps finer than 4 tiles


def test_tiny_trains_at_the_learning_rate_the_other_backbones_take(tmp_path):
  """At lr 3e-3, batch 8, the mean-loss step without a trust region (the old rule) gave a
  NaN loss at step 17 (and at step 24 with batch 16)."""
  cfg = helpers.load_config("tlm_hope_attention", "tiny")
  cfg.train.update(batch_size=8, learning_rate=3e-3, warmup_steps=10, lr_schedule="constant")
  cfg.data.data_dir = str(tmp_path)
  batches = list(itertools.islice(pipeline.make_iterator(cfg, "train"), 24))
  losses, _ = helpers.run_steps(cfg, batches, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  assert np.all(np.isfinite(losses))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 1.5


def test_an_in_context_level_at_lr_0_gives_finite_gradients():
  """The no-in-context control: the trust region's norm of a zero step had a NaN gradient
  (62 of 71 leaves NaN with 4 layers). 20 tokens: the level at lr 3e-4 takes a zero step
  on its partial last chunk, all padding; every level at lr 0: the next test."""
  cfg = helpers.load_config("tlm_hope_attention", "tiny")
  cfg.model.num_layers = 1
  cfg.model.hope.update(inner_lrs=(0.0, 3e-4, 0.0), max_step=0.1)
  graphdef, params = nnx.split(state.build_model(cfg))
  tokens_BT = jax.random.randint(jax.random.key(0), (1, 20), 0, 256)
  loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(tokens_BT))[..., 0])
  leaves = jax.tree.leaves(jax.jit(jax.grad(loss))(params))
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert sum(bool(jnp.any(g != 0)) for g in leaves) > len(leaves) / 2


def test_a_level_at_lr_0_equals_the_level_without_a_trust_region():
  """Outputs and outer gradients at inner lr 0 do not depend on max_step."""
  weights, w_value, u = level_inputs(length=20)

  def run(weights, w_value, u, max_step):
    level = lambda w, v, u: hope.in_context_level(w, v, u, 8, 0.0, max_step)[0]
    grads = jax.grad(lambda *args: jnp.sum(level(*args) ** 2), argnums=(0, 1, 2))
    return level(weights, w_value, u), grads(weights, w_value, u)

  run = jax.jit(run, static_argnums=3)
  (y, grads), (y_free, grads_free) = run(weights, w_value, u, 0.1), run(weights, w_value, u, 0.0)
  np.testing.assert_array_equal(y, y_free)
  np.testing.assert_allclose(y, hope.swiglu(weights, u), atol=1e-6)  # start weights throughout
  for g, g_free in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_free)):
    assert jnp.all(jnp.isfinite(g))
    np.testing.assert_allclose(g, g_free, rtol=1e-6, atol=1e-7)


def test_rematerialised_training_equals_the_plain_scan():
  """The tiny config's CMS with groups of 4 chunks under jax.checkpoint: the same loss and
  gradients (every parameter and the input). 60 tokens: 7 chunks of 8 (a group and a
  remainder of 3) and a partial chunk; 3 chunks of 16 (one group, shorter than 4) and a
  partial chunk."""
  spec = config_lib.model_spec(helpers.load_config("tlm_hope_attention", "tiny"))
  x_BTD = jax.random.normal(jax.random.key(1), (2, 60, spec.d_model))
  target_BTD = jax.random.normal(jax.random.key(2), x_BTD.shape)

  def loss_and_grads(remat_chunks):
    hope_spec = dataclasses.replace(spec.hope, remat_chunks=remat_chunks)
    cms = hope.CMS(dataclasses.replace(spec, hope=hope_spec), 128, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(cms)
    loss = lambda p, x: jnp.mean((nnx.merge(graphdef, p)(x) - target_BTD) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x_BTD)

  (loss, grads), (plain_loss, plain_grads) = loss_and_grads(4), loss_and_grads(0)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  leaves, plain_leaves = jax.tree.leaves(grads), jax.tree.leaves(plain_grads)
  assert len(leaves) == len(plain_leaves) == 3 * 3 + 2 + 1  # 3 levels, 2 value maps, x
  for g, plain in zip(leaves, plain_leaves):
    assert bool(jnp.any(plain != 0))
    np.testing.assert_allclose(g, plain, rtol=1e-5, atol=1e-6 * float(jnp.abs(plain).max()))


def test_decoding_in_pieces_of_any_size_equals_call():
  """Pieces of 1, C - 1, C, C + 1, 2C + 3 ... tokens (C = 8; the second level's chunk is 16),
  starting at chunk boundaries and inside chunks, equal __call__ at every position."""
  cfg = helpers.load_config("tlm_hope_attention", "tiny")
  cfg.model.hope.inner_lrs = (0.1, 0.1, 0.0)  # steps that move outputs beyond the tolerance
  spec = config_lib.model_spec(cfg)
  assert spec.hope.chunk_sizes == (8, 16, 0)
  graphdef, params = nnx.split(hope.CMS(spec, 128, rngs=nnx.Rngs(0)))
  sizes = (1, 7, 8, 9, 19, 16, 1, 8, 7, 9)  # starts 0, 1, 8, 16, 25, 44, 60, 61, 69, 76
  x_BTD = jax.random.normal(jax.random.key(1), (2, sum(sizes), spec.d_model))
  want = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, x_BTD)
  decode = jax.jit(lambda p, x, cache: nnx.merge(graphdef, p).decode(x, cache))
  cache, start = nnx.merge(graphdef, params).init_cache(2, sum(sizes)), 0
  for size in sizes:
    y_BTD, cache = decode(params, x_BTD[:, start : start + size], cache)
    np.testing.assert_allclose(y_BTD, want[:, start : start + size], rtol=1e-4, atol=1e-5)
    start += size
  assert [int(c["n"]) for c in cache] == [start % 8, start % 16]
