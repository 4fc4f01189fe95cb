"""Hope-attention's CMS levels against a token-by-token reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tlm_jax.model import hope


def level_inputs(length=24, dim=8, width=16, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  weights = (
    0.3 * jax.random.normal(keys[0], (dim, width)),
    0.3 * jax.random.normal(keys[1], (dim, width)),
    0.3 * jax.random.normal(keys[2], (width, dim)),
  )
  w_value = jax.random.normal(keys[3], (dim, dim)) / np.sqrt(dim)
  return weights, w_value, jax.random.normal(keys[4], (length, dim))


def reference(weights, w_value, u, chunk_size, lr):
  """Token by token: every chunk_size tokens, one step on the finished chunk's mean loss."""
  outputs = []
  for t in range(u.shape[0]):
    if t and t % chunk_size == 0:
      grads = jax.grad(hope.associative_loss)(weights, u[t - chunk_size : t], w_value)
      weights = tuple(w - lr * g for w, g in zip(weights, grads))
    outputs.append(hope.swiglu(weights, u[t]))
  return jnp.stack(outputs)


@pytest.mark.parametrize("chunk_size", [1, 4, 8, 24])
def test_level_equals_the_sequential_rule(chunk_size):
  weights, w_value, u = level_inputs()
  y, _ = hope.in_context_level(weights, w_value, u, chunk_size, 0.05)
  np.testing.assert_allclose(y, reference(weights, w_value, u, chunk_size, 0.05), atol=1e-5)


def test_weights_change_only_at_multiples_of_the_chunk_size():
  weights, w_value, u = level_inputs()
  _, used = hope.in_context_level(weights, w_value, u, 8, 0.05)
  assert used[0].shape[0] == 3  # one set of weights per chunk of 8 tokens
  for w0, chunks in zip(weights, used):
    np.testing.assert_array_equal(chunks[0], w0)
    assert all(not np.allclose(chunks[j], chunks[j + 1]) for j in range(2))
  # Tokens inside a chunk see the same weights: changing a later token of
  # the chunk leaves earlier tokens' outputs alone, and no token sees its own chunk.
  y, _ = hope.in_context_level(weights, w_value, u, 8, 0.05)
  y2, _ = hope.in_context_level(weights, w_value, u.at[13].add(5.0), 8, 0.05)
  np.testing.assert_allclose(y2[:13], y[:13], atol=1e-6)
  np.testing.assert_allclose(y2[14:16], y[14:16], atol=1e-6)
  assert not np.allclose(y2[16:], y[16:], atol=1e-4)


def test_outer_gradients_reach_the_start_weights_and_value_map():
  weights, w_value, u = level_inputs()
  objective = lambda w, v: jnp.sum(hope.in_context_level(w, v, u, 8, 0.05)[0] ** 2)
  grads = jax.grad(objective, argnums=(0, 1))(weights, w_value)
  for g in jax.tree.leaves(grads):
    assert jnp.all(jnp.isfinite(g)) and jnp.abs(g).sum() > 0
