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
from flax import nnx

from tlm_jax.config import ModelSpec
from tlm_jax.errors import ConfigError
from tlm_jax.model.attention import Attention
from tlm_jax.model.costs import memory_shapes
from tlm_jax.model.layers import output_std, param

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


def token_gradients(
  weights: list[Array], k_CH: Array, v_CH: Array
) -> tuple[list[Array], list[Array]]:
  """Per-token gradients of ||M(k) - v||^2 as factors.

  grad_s(W_l) = outer(ins[l][s], deltas[l][s]).
  """
  ins, pres, h = [], [], k_CH
  for i, w in enumerate(weights):
    ins.append(h)
    z = h @ w
    pres.append(z)
    h = jax.nn.silu(z) if i < len(weights) - 1 else z
  delta = 2 * (h - v_CH)
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
  """One chunk for one head.

  (M_c, S_c), (q, k, v, eta, theta, alpha) -> (M, S at the chunk's end), reads.
  """
  weights, surprise = state
  q_CH, k_CH, v_CH, eta_C, theta_C, alpha_C = chunk
  ins, deltas = token_gradients(weights, k_CH, v_CH)
  keep_C = jnp.cumsum(jnp.log1p(-alpha_C))  # log prod (1 - alpha)
  momentum_C = jnp.cumsum(jnp.log(eta_C))  # log prod eta
  forget_CC, carry_CC = _decay_matrix(keep_C), _decay_matrix(momentum_C)
  a_C = jnp.exp(keep_C)  # weight of M_c in M_t
  b_C = forget_CC @ jnp.exp(momentum_C)  # weight of S_c in M_t
  # mix[t, s]: weight of -theta_s * grad_s in M_t.
  mix_CC = (forget_CC @ carry_CC) * theta_C[None, :]
  h = q_CH
  for l, (w, s) in enumerate(zip(weights, surprise)):
    z = a_C[:, None] * (h @ w) + b_C[:, None] * (h @ s) - (mix_CC * (h @ ins[l].T)) @ deltas[l]
    h = jax.nn.silu(z) if l < len(weights) - 1 else z
  last_surprise_C = carry_CC[-1] * theta_C
  new_weights = [
    a_C[-1] * w + b_C[-1] * s - ins[l].T @ (mix_CC[-1][:, None] * deltas[l])
    for l, (w, s) in enumerate(zip(weights, surprise))
  ]
  new_surprise = [
    jnp.exp(momentum_C[-1]) * s - ins[l].T @ (last_surprise_C[:, None] * deltas[l])
    for l, s in enumerate(surprise)
  ]
  return (new_weights, new_surprise), h


def memory_read(
  weights0: list[Array],
  q_TH: Array,
  k_TH: Array,
  v_TH: Array,
  eta_T: Array,
  theta_T: Array,
  alpha_T: Array,
  chunk_size: int,
) -> Array:
  """Reads y_t = M_t(q_t) for one head over a sequence (T divisible by chunk_size).

  The memory starts at weights0 with zero surprise; everything is
  differentiable, so the outer model learns weights0, the projections and
  the gates through the inner updates.
  """
  length = q_TH.shape[0]
  chunks = length // chunk_size

  def split(x):
    return x.reshape(chunks, chunk_size, *x.shape[1:])

  xs = tuple(split(x) for x in (q_TH, k_TH, v_TH, eta_T, theta_T, alpha_T))
  state = (list(weights0), [jnp.zeros_like(w) for w in weights0])
  _, y = jax.lax.scan(memory_chunk, state, xs)
  return y.reshape(length, -1)


def multihead_memory_read(
  weights0: list[Array],
  q_BTNH: Array,
  k_BTNH: Array,
  v_BTNH: Array,
  eta_BTN: Array,
  theta_BTN: Array,
  alpha_BTN: Array,
  chunk_size: int,
) -> Array:
  """Batched over (batch, heads); weights0[l] is (N, in, out). Returns reads (B, T, N, H)."""
  per_head = jax.vmap(memory_read, in_axes=(0, 1, 1, 1, 1, 1, 1, None), out_axes=1)
  return jax.vmap(per_head, in_axes=(None, 0, 0, 0, 0, 0, 0, None))(
    weights0, q_BTNH, k_BTNH, v_BTNH, eta_BTN, theta_BTN, alpha_BTN, chunk_size
  )


def causal_conv(x_BTNH: Array, kernel_WNH: Array) -> Array:
  """Depthwise causal convolution over time: y_t = sum_j kernel[j] * x_{t-j}."""
  width, length = kernel_WNH.shape[0], x_BTNH.shape[1]
  padded = jnp.pad(x_BTNH, ((0, 0), (width - 1, 0), (0, 0), (0, 0)))
  return sum(
    kernel_WNH[j] * padded[:, width - 1 - j : width - 1 - j + length] for j in range(width)
  )


def l2_normalize(x: Array) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


class NeuralMemory(nnx.Module):
  """Multi-head Titans memory: q/k/v projections, causal conv, gates, chunked memory, output.

  eta (momentum), theta (inner learning rate, at most titans.max_inner_lr)
  and alpha (forgetting) are sigmoids of per-head linear maps of x_t. The
  initial memory weights are ordinary parameters, learned by the outer loop.
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    d, n, h = spec.d_model, spec.num_heads, spec.head_dim
    pdt, std = jnp.dtype(spec.param_dtype), spec.init_std
    for name in ("w_q", "w_k", "w_v"):
      setattr(self, name, param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pdt))
    for name in ("conv_q", "conv_k", "conv_v"):  # start as identity filters
      setattr(
        self,
        name,
        nnx.Param(
          jnp.zeros((4, n, h), pdt).at[0].set(1.0), logical_axes=(None, "heads", "head_dim")
        ),
      )
    for name in ("w_eta", "w_theta", "w_alpha"):
      setattr(self, name, param(rngs, (d, n), ("embed", "heads"), std, pdt))
    # Biases: momentum ~0.5, inner lr ~0.5 * max, forgetting ~0.02 at the start. Within a
    # chunk the same stale gradient is applied chunk_size times and momentum amplifies it
    # by 1 / (1 - eta), so a mild start keeps the inner loop from diverging.
    for name, value in (("b_eta", 0.0), ("b_theta", 0.0), ("b_alpha", -4.0)):
      setattr(self, name, nnx.Param(jnp.full((n,), value, pdt), logical_axes=("heads",)))
    self.memory = nnx.List(
      [
        param(rngs, (n, fan_in, fan_out), ("heads", None, None), fan_in**-0.5, pdt)
        for fan_in, fan_out in memory_shapes(spec)
      ]
    )
    self.w_o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), output_std(spec), pdt)
    self.chunk_size, self.max_inner_lr = spec.titans.chunk_size, spec.titans.max_inner_lr
    self.dtype = jnp.dtype(spec.dtype)

  def check_length(self, length: int) -> None:
    if length % self.chunk_size:
      raise ConfigError(
        f"sequence length {length} is not a multiple of model.titans.chunk_size="
        f"{self.chunk_size}; change train.seq_len or the chunk size"
      )

  def project(self, x_BTD: Array, name: str, tail_BWNH: Array | None = None) -> tuple[Array, Array]:
    """x W_name through the causal conv (q and k L2-normalised), float32 (B, T, N, H).

    tail: the 3 pre-conv rows before x (a previous segment's), zeros if None.
    Returns the result and the new tail (the last 3 pre-conv rows).
    """
    kernel = getattr(self, f"conv_{name}")[...].astype(self.dtype)
    y_BTNH = jnp.einsum(
      "btd,dnh->btnh", x_BTD.astype(self.dtype), getattr(self, f"w_{name}")[...].astype(self.dtype)
    )
    width = kernel.shape[0] - 1
    if tail_BWNH is None:
      tail_BWNH = jnp.zeros((y_BTNH.shape[0], width, *y_BTNH.shape[2:]), y_BTNH.dtype)
    full_BTNH = jnp.concatenate([tail_BWNH.astype(y_BTNH.dtype), y_BTNH], axis=1)
    out_BTNH = causal_conv(full_BTNH, kernel)[:, width:].astype(jnp.float32)
    return (out_BTNH if name == "v" else l2_normalize(out_BTNH)), full_BTNH[:, -width:]

  def gates(self, x_BTD: Array) -> tuple[Array, Array, Array]:
    """eta, theta, alpha, float32 (B, T, N)."""
    x = x_BTD.astype(self.dtype)

    def gate(w, b):
      logits = jnp.einsum("btd,dn->btn", x, w[...].astype(self.dtype)).astype(jnp.float32)
      return jax.nn.sigmoid(logits + b[...])

    return (
      gate(self.w_eta, self.b_eta),
      self.max_inner_lr * gate(self.w_theta, self.b_theta),
      gate(self.w_alpha, self.b_alpha),
    )

  def initial_weights(self) -> list[Array]:
    return [w[...].astype(jnp.float32) for w in self.memory]

  def output(self, y_BTNH: Array) -> Array:
    return jnp.einsum("btnh,nhd->btd", y_BTNH.astype(self.dtype), self.w_o[...].astype(self.dtype))

  def __call__(self, x_BTD: Array) -> Array:
    self.check_length(x_BTD.shape[1])
    (q_BTNH, _), (k_BTNH, _), (v_BTNH, _) = (self.project(x_BTD, n) for n in "qkv")
    y_BTNH = multihead_memory_read(
      self.initial_weights(), q_BTNH, k_BTNH, v_BTNH, *self.gates(x_BTD), self.chunk_size
    )
    return self.output(y_BTNH)


class Titans(nnx.Module):
  """A Titans token mixer: neural memory with sliding-window attention.

  mag (memory as a gate): attention and memory read the same input in
  parallel; a learned per-channel sigmoid gate g(x) mixes them,
  g * attention + (1 - g) * memory.
  mal (memory as a layer): the memory's output is added to the stream and
  attention reads the result: m = memory(x); out = m + attention(x + m).
  mac (memory as context): segments of titans.chunk_size tokens, in order.
  For segment i, with the memory as left by segments < i:
    h = memory read of the segment's queries (no update yet), projected to d;
    y = attention of the segment's tokens over [persistent | h | segment]
        (token t sees the persistent slots and h_s, x_s for s <= t in its
        segment: attention is segment-local, the memory carries the past);
    the memory then takes its chunk step on keys/values/gates of y, and
    out = y + memory read of y's queries (the paper's y (x) M(y), as a sum).
  The attention is `Attention` with model.attention_window (mag, mal) and
  model.persistent_tokens (Titans' persistent memory).
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    self.variant = spec.titans.variant
    self.memory = NeuralMemory(spec, rngs=rngs)
    self.attention = Attention(spec, rngs=rngs)
    if self.variant == "mag":
      d, pdt = spec.d_model, jnp.dtype(spec.param_dtype)
      self.w_mix = param(rngs, (d, d), ("embed", None), spec.init_std, pdt)
      self.b_mix = nnx.Param(jnp.zeros((d,), pdt), logical_axes=(None,))

  def __call__(self, x_BTD: Array, positions_BT: Array) -> Array:
    if self.variant == "mac":
      return self.memory_as_context(x_BTD, positions_BT)
    m_BTD = self.memory(x_BTD)
    if self.variant == "mal":
      return m_BTD + self.attention(x_BTD + m_BTD, positions_BT)
    a_BTD = self.attention(x_BTD, positions_BT)
    dtype = a_BTD.dtype
    mix = x_BTD.astype(dtype) @ self.w_mix[...].astype(dtype) + self.b_mix[...].astype(dtype)
    g_BTD = jax.nn.sigmoid(mix)
    return g_BTD * a_BTD + (1 - g_BTD) * m_BTD

  def memory_as_context(self, x_BTD: Array, positions_BT: Array) -> Array:
    mem, size = self.memory, self.memory.chunk_size
    mem.check_length(x_BTD.shape[1])
    batch, length, dim = x_BTD.shape
    q_BTNH, _ = mem.project(x_BTD, "q")
    weights = [jnp.broadcast_to(w, (batch, *w.shape)) for w in mem.initial_weights()]
    tails = {n: jnp.zeros((batch, 3, *q_BTNH.shape[2:]), self.memory.dtype) for n in "qkv"}
    causal = jnp.tril(jnp.ones((size, size), bool))
    mask_CS = jnp.concatenate([causal, causal], axis=1)  # [h | segment]
    read = jax.vmap(jax.vmap(mlp_apply, in_axes=(0, 1), out_axes=1))
    chunk_step = jax.vmap(jax.vmap(memory_chunk, in_axes=(0, (1,) * 6), out_axes=(0, 1)))

    def segment(carry, seg):
      weights, surprise, tails = carry
      x_BCD, q_BCNH, pos_BC = seg
      h_BCD = mem.output(read(weights, q_BCNH))
      y_BCNH = self.attention.attend_context(
        x_BCD,
        jnp.concatenate([h_BCD, x_BCD], 1),
        pos_BC,
        jnp.concatenate([pos_BC, pos_BC], 1),
        mask_CS,
      )
      y_BCD = self.attention.project(y_BCNH)
      projected = {n: mem.project(y_BCD, n, tails[n]) for n in "qkv"}
      chunk = tuple(projected[n][0] for n in "qkv") + mem.gates(y_BCD)
      (weights, surprise), out_BCNH = chunk_step((weights, surprise), chunk)
      tails = {n: projected[n][1] for n in "qkv"}
      return (weights, surprise, tails), y_BCD + mem.output(out_BCNH)

    def by_segment(a):
      return jnp.moveaxis(a.reshape(batch, length // size, size, *a.shape[2:]), 1, 0)

    carry = (weights, [jnp.zeros_like(w) for w in weights], tails)
    _, out = jax.lax.scan(segment, carry, tuple(map(by_segment, (x_BTD, q_BTNH, positions_BT))))
    return jnp.moveaxis(out, 0, 1).reshape(batch, length, dim)
