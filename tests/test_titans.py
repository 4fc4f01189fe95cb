"""Titans' chunked neural memory against plain token-by-token references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlm_jax.model import titans

jax.config.update("jax_enable_x64", False)


def inputs(length=12, dim=8, hidden=16, depth=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(keys[0], (length, dim)))
  k = unit(jax.random.normal(keys[1], (length, dim)))
  v = jax.random.normal(keys[2], (length, dim))
  eta = jax.nn.sigmoid(jax.random.normal(keys[3], (length,)) + 1.0)
  theta = 0.3 * jax.nn.sigmoid(jax.random.normal(keys[4], (length,)))
  alpha = 0.2 * jax.nn.sigmoid(jax.random.normal(keys[5], (length,)))
  shapes = (
    [(dim, hidden)] + [(hidden, hidden)] * (depth - 2) + [(hidden, dim)]
    if depth > 1
    else [(dim, dim)]
  )
  weights = [
    0.5 * jax.random.normal(kk, s) / np.sqrt(s[0])
    for kk, s in zip(jax.random.split(keys[6], depth), shapes)
  ]
  return weights, q, k, v, eta, theta, alpha


def reference(weights, q, k, v, eta, theta, alpha, chunk_size):
  """The rule as written, one token at a time; the gradient via jax.grad at the chunk's start."""
  memory = [w for w in weights]
  surprise = [jnp.zeros_like(w) for w in weights]
  loss = lambda ws, kt, vt: jnp.sum((titans.mlp_apply(ws, kt) - vt) ** 2)
  reads = []
  for t in range(q.shape[0]):
    if t % chunk_size == 0:
      anchor = memory
    grads = jax.grad(loss)(anchor, k[t], v[t])
    surprise = [eta[t] * s - theta[t] * g for s, g in zip(surprise, grads)]
    memory = [(1 - alpha[t]) * m + s for m, s in zip(memory, surprise)]
    reads.append(titans.mlp_apply(memory, q[t]))
  return jnp.stack(reads)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chunk_size_one_equals_the_token_by_token_rule(depth):
  args = inputs(depth=depth)
  np.testing.assert_allclose(
    titans.memory_read(*args, chunk_size=1), reference(*args, 1), atol=1e-5
  )


@pytest.mark.parametrize("chunk_size", [2, 4, 12])
def test_chunked_equals_a_sequential_loop_of_the_chunked_rule(chunk_size):
  args = inputs()
  np.testing.assert_allclose(
    titans.memory_read(*args, chunk_size=chunk_size), reference(*args, chunk_size), atol=1e-5
  )
  assert not np.allclose(reference(*args, chunk_size), reference(*args, 1), atol=1e-4)


def test_reads_are_causal():
  args = list(inputs())
  base = titans.memory_read(*args, chunk_size=4)
  args[2] = args[2].at[7:].set(0.0)  # change keys from token 7 on
  args[3] = args[3].at[7:].add(1.0)
  changed = titans.memory_read(*args, chunk_size=4)
  np.testing.assert_allclose(changed[:7], base[:7], atol=1e-6)
  assert not np.allclose(changed[7:], base[7:], atol=1e-4)


def test_outer_gradients_flow_through_the_inner_updates():
  weights, q, k, v, eta, theta, alpha = inputs()

  def objective(weights, k, v, eta, theta, alpha):
    return jnp.sum(titans.memory_read(weights, q, k, v, eta, theta, alpha, 4) ** 2)

  grads = jax.grad(objective, argnums=(0, 1, 2, 3, 4, 5))(weights, k, v, eta, theta, alpha)
  for g in jax.tree.leaves(grads):
    assert jnp.all(jnp.isfinite(g)) and jnp.abs(g).sum() > 0
