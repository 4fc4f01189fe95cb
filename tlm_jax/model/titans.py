"""Titans' neural long-term memory (Behrouz, Zhong, Mirrokni 2025), trained in parallel over chunks.

Per head, the memory M is a small MLP (`titans.memory_depth` linear layers,
SiLU between them) learned at test time. For token t, with k_t, v_t, q_t the
conv-filtered projections (q and k L2-normalised):

    loss      l(M; x_t) = || M(k_t) - v_t ||^2
    surprise  S_t = eta_t * S_{t-1} - theta_t * grad l(M_c; x_t)
    update    M_t = (1 - alpha_t) * M_{t-1} + S_t
    read      y_t = M_t(q_t)

where M_c is the memory at the end of the previous chunk of
`titans.chunk_size` tokens (chunk size 1: the memory just before token t,
the fully sequential rule). The gradient of one token's loss for a linear
layer is an outer product in_s x delta_s, so inside a chunk every M_t is
M_c, S_c and a weighted sum of those outer products. The two linear
recurrences are solved in closed form from cumulative log-decays (what an
associative scan of (decay, input) pairs computes, written as lower-
triangular chunk x chunk matrices), and reads become matmuls, as in linear
attention. Chunks are chained with lax.scan.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def silu_grad(z: Array) -> Array:
  s = jax.nn.sigmoid(z)
  return s * (1 + z * (1 - s))


def mlp_apply(weights: list[Array], x: Array) -> Array:
  """The memory MLP: x @ W_0 -> SiLU -> ... -> @ W_last."""
  for i, w in enumerate(weights):
    x = x @ w
    if i < len(weights) - 1:
      x = jax.nn.silu(x)
  return x


def token_gradients(weights: list[Array], k_CK: Array, v_CK: Array) -> tuple[list[Array], list[Array]]:
  """Per-token gradients of ||M(k) - v||^2 as factors: grad_s(W_l) = outer(ins[l][s], deltas[l][s])."""
  ins, pres, h = [], [], k_CK
  for i, w in enumerate(weights):
    ins.append(h)
    z = h @ w
    pres.append(z)
    h = jax.nn.silu(z) if i < len(weights) - 1 else z
  delta = 2 * (h - v_CK)
  deltas = [None] * len(weights)
  for l in range(len(weights) - 1, -1, -1):
    deltas[l] = delta
    if l:
      delta = (delta @ weights[l].T) * silu_grad(pres[l - 1])
  return ins, deltas


def _decay_matrix(log_cum_C: Array) -> Array:
  """D[t, u] = exp(L[t] - L[u]) for u <= t (the product of decays after u up to t), else 0."""
  size = log_cum_C.shape[0]
  lower = jnp.tril(jnp.ones((size, size), bool))
  diff = jnp.where(lower, log_cum_C[:, None] - log_cum_C[None, :], -jnp.inf)
  return jnp.exp(diff)


def memory_chunk(state, chunk):
  """One chunk for one head: (M_c, S_c), (q, k, v, eta, theta, alpha) -> (M, S at chunk end), reads."""
  weights, surprise = state
  q_CK, k_CK, v_CK, eta_C, theta_C, alpha_C = chunk
  ins, deltas = token_gradients(weights, k_CK, v_CK)
  keep_C = jnp.cumsum(jnp.log1p(-alpha_C))  # log prod (1 - alpha)
  momentum_C = jnp.cumsum(jnp.log(eta_C))  # log prod eta
  forget_CC, carry_CC = _decay_matrix(keep_C), _decay_matrix(momentum_C)
  a_C = jnp.exp(keep_C)  # weight of M_c in M_t
  b_C = forget_CC @ jnp.exp(momentum_C)  # weight of S_c in M_t
  # mix[t, s]: weight of -theta_s * grad_s in M_t.
  mix_CC = (forget_CC @ carry_CC) * theta_C[None, :]
  h = q_CK
  for l, (w, s) in enumerate(zip(weights, surprise)):
    z = a_C[:, None] * (h @ w) + b_C[:, None] * (h @ s) - (mix_CC * (h @ ins[l].T)) @ deltas[l]
    h = jax.nn.silu(z) if l < len(weights) - 1 else z
  last_surprise_C = carry_CC[-1] * theta_C
  new_weights = [a_C[-1] * w + b_C[-1] * s - ins[l].T @ (mix_CC[-1][:, None] * deltas[l])
                 for l, (w, s) in enumerate(zip(weights, surprise))]
  new_surprise = [jnp.exp(momentum_C[-1]) * s - ins[l].T @ (last_surprise_C[:, None] * deltas[l])
                  for l, s in enumerate(surprise)]
  return (new_weights, new_surprise), h


def memory_read(weights0: list[Array], q_TK: Array, k_TK: Array, v_TK: Array, eta_T: Array,
                theta_T: Array, alpha_T: Array, chunk_size: int) -> Array:
  """Reads y_t = M_t(q_t) for one head over a sequence (T divisible by chunk_size).

  The memory starts at weights0 with zero surprise; everything is
  differentiable, so the outer model learns weights0, the projections and
  the gates through the inner updates.
  """
  length = q_TK.shape[0]
  chunks = length // chunk_size

  def split(x):
    return x.reshape(chunks, chunk_size, *x.shape[1:])

  xs = tuple(split(x) for x in (q_TK, k_TK, v_TK, eta_T, theta_T, alpha_T))
  state = (list(weights0), [jnp.zeros_like(w) for w in weights0])
  _, y = jax.lax.scan(memory_chunk, state, xs)
  return y.reshape(length, -1)


def multihead_memory_read(weights0: list[Array], q: Array, k: Array, v: Array, eta: Array,
                          theta: Array, alpha: Array, chunk_size: int) -> Array:
  """Batched over (batch, heads): q/k/v (B, T, H, K), gates (B, T, H), weights0[l] (H, in, out)."""
  per_head = jax.vmap(memory_read, in_axes=(0, 1, 1, 1, 1, 1, 1, None), out_axes=1)
  return jax.vmap(per_head, in_axes=(None, 0, 0, 0, 0, 0, 0, None))(
      weights0, q, k, v, eta, theta, alpha, chunk_size)

