"""The splash attention path: the Pallas kernel (in interpret mode on the CPU) against XLA's
attention, through the Attention module on a mesh, and compiled for a TPU topology."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from tlm_jax import aot, config, sharding
from tlm_jax.errors import ConfigError
from tlm_jax.model import attention, splash

BF16_TOL = dict(atol=2e-2, rtol=2e-2)


def qkv(length: int, heads: int, kv_heads: int, head_dim: int, batch: int = 2):
  keys = jax.random.split(jax.random.key(0), 3)
  shapes = ((batch, length, heads, head_dim), *[(batch, length, kv_heads, head_dim)] * 2)
  return [jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes)]


def xla_attention(q_BTNH, k_BTKH, v_BTKH, window: int):
  length = q_BTNH.shape[1]
  t, s = np.arange(length)[:, None], np.arange(length)[None]
  visible_TS = (s <= t) & ((t - s < window) if window else True)
  return jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, mask=visible_TS[None, None])


def as_f32(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float32), tree)


CASES = {  # (length, heads, kv_heads, head_dim, window)
  "causal": (256, 4, 4, 64, 0),
  "gqa": (128, 4, 2, 32, 0),
  "window": (256, 4, 2, 32, 96),
  "padded_length": (200, 2, 1, 32, 0),  # not a multiple of the kernel's 128-token tiles
}


@pytest.mark.parametrize("case", CASES)
def test_splash_matches_xla_attention(case):
  *shape, window = CASES[case]
  q, k, v = qkv(*shape)
  got = jax.jit(functools.partial(splash.attention, window=window, interpret=True))(q, k, v)
  np.testing.assert_allclose(*as_f32((got, xla_attention(q, k, v, window))), **BF16_TOL)


def test_splash_gradients_match_xla():
  q, k, v = qkv(128, 4, 2, 32)
  cotangent = jax.random.normal(jax.random.key(1), q.shape, jnp.float32)

  def grads(fn):
    loss = lambda *qkv: (fn(*qkv).astype(jnp.float32) * cotangent).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  got = grads(functools.partial(splash.attention, window=64, interpret=True))
  want = grads(functools.partial(xla_attention, window=64))
  for g, w in zip(*as_f32((got, want))):
    np.testing.assert_allclose(g, w, atol=0.05 * np.abs(w).max(), rtol=0)


@pytest.mark.parametrize("window", [0, 64])
def test_attention_module_routes_splash_per_shard(monkeypatch, window):
  """The tiny config's Attention (4 heads, 2 kv heads) on a data x fsdp x tensor mesh: the
  kernel sees a quarter of the batch and half the heads, and agrees with XLA."""
  shard_shapes = []

  def spy(q_BTNH, *args, **kwargs):
    shard_shapes.append(q_BTNH.shape)
    return local(q_BTNH, *args, **kwargs)

  local = splash._attention
  monkeypatch.setattr(splash, "_attention", spy)
  monkeypatch.setattr(splash, "attention", functools.partial(splash.attention, interpret=True))
  cfg = helpers.load_config("tlm_transformer", "tiny")
  cfg.model.update(attention_window=window, dtype="bfloat16")
  spec = config.model_spec(cfg)
  mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])
  x_BTD = jax.random.normal(jax.random.key(2), (4, 128, spec.d_model))
  x_BTD = jax.device_put(x_BTD, sharding.batch_sharding(mesh))
  positions_BT = jnp.broadcast_to(jnp.arange(128), (4, 128))
  outputs = []
  for impl in ("splash", "xla"):
    module = attention.Attention(dataclasses.replace(spec, attention_impl=impl), rngs=nnx.Rngs(0))
    outputs.append(jax.jit(lambda x, module=module: module(x, positions_BT))(x_BTD))
  assert shard_shapes == [(1, 128, 2, spec.head_dim)]
  np.testing.assert_allclose(*as_f32(outputs), **BF16_TOL)


@pytest.mark.parametrize(
  "fields",
  [dict(persistent_tokens=4), dict(backbone="titans")],
  ids=["persistent_tokens", "titans"],
)
def test_splash_config_errors_name_the_field_and_the_fix(fields):
  cfg = helpers.load_config("tlm_transformer", "tiny")
  cfg.model.update(attention_impl="splash", **fields)
  field = f"model.{next(iter(fields))}"
  with pytest.raises(ConfigError, match=re.escape(field) + ".*attention_impl='xla'"):
    config.validate(cfg)


def test_splash_outside_tpu_says_so():
  q, k, v = qkv(128, 2, 2, 32)
  with pytest.raises(ConfigError, match="runs on TPUs only"):
    jax.jit(splash.attention)(q, k, v)


def test_tiny_train_step_with_splash_compiles_for_tpu():
  """The real train step with the Mosaic kernel (not interpreted), heads split over tensor."""
  cfg = helpers.load_config("tlm_transformer", "tiny")
  cfg.model.attention_impl = "splash"
  cfg.mesh.tensor = 2
  splash._kernel.cache_clear()
  report = aot.compile_for_topology(cfg, "v5e:2x2")
  assert report["mesh"] == dict(data=2, fsdp=1, tensor=2) and report["fits"]
  assert 0 < report["per_device_gib"]["peak"] < report["hbm_per_chip_gib"]
  # One kernel (local heads 4 / tensor 2, not interpreted) for every layer.
  assert splash._kernel.cache_info().currsize == 1
  assert splash._kernel.cache_info().hits > 0
