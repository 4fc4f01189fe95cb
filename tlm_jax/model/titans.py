"""Titans (Behrouz, Zhong, Mirrokni 2025): a neural long-term memory learned at test time, and
the three ways the paper puts it beside sliding-window attention (MAG, MAL, MAC).

Per head, the memory M is a small MLP (`titans.memory_depth` linear layers,
SiLU between them) learned at test time. For token t, with k_t, v_t, q_t the
projections through a depthwise causal conv and SiLU (q and k L2-normalised):

    loss      l(M; x_t) = || M(k_t) - v_t ||^2
    surprise  S_t = eta_t * S_{t-1} - theta_t * grad l(M_c; x_t)
    update    M_t = (1 - alpha_t) * M_{t-1} + S_t
    read      y_t = M_t(q_t)

where M_c is the memory at the end of the previous chunk of
`titans.chunk_size` tokens (chunk size 1: the memory just before token t,
the fully sequential rule). The gradient of one token's loss for a linear
layer is an outer product in_s x delta_s, so inside a chunk every M_t is
M_c, S_c and a weighted sum of those outer products. The two linear
recurrences are solved in closed form with lower-triangular chunk x chunk
decay matrices (what an associative scan of (decay, input) pairs computes),
and reads become matmuls, as in linear attention. Chunks are chained with
lax.scan; with `titans.remat_chunks` the scan runs over groups of chunks that
the backward pass recomputes from each group's first state, so a layer keeps
the memory state of the group boundaries only. Each token's gradient is scaled
to a norm of at most `titans.max_grad_norm` (not in the paper; 0 turns it off):
inside a chunk the same stale gradient is applied up to chunk_size times,
amplified by momentum, so the chunked rule can blow up where the token-by-token
rule stays bounded.

The decay matrices are products of (1 - alpha) and of eta over (u, t]. They
are summed in log space segment by segment (each entry its own sum, not a
difference of running sums) from logs floored at the smallest normal float32:
a gate of exactly 0 or 1 (a sigmoid saturates in float32 once its logit
passes ~17 or falls below ~-104) then gives decays of 0 and finite
gradients, as the token-by-token product does, instead of -inf - (-inf).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax.model.attention import Attention, attention_mask
from tlm_jax.model.costs import CONV_WIDTH, memory_shapes
from tlm_jax.model.layers import RMSNorm, output_std, param
from tlm_jax.spec import ModelSpec

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


def clip_gradients(ins: list[Array], deltas: list[Array], max_norm: float) -> list[Array]:
  """Deltas scaled so that each token's gradient, all layers together, has a norm of at most
  max_norm (0: no cap). |outer(in, delta)| = |in| |delta|, so the factors suffice."""
  if not max_norm:
    return deltas
  squares_C = sum(jnp.sum(i * i, -1) * jnp.sum(d * d, -1) for i, d in zip(ins, deltas))
  scale_C = jnp.minimum(1.0, max_norm * jax.lax.rsqrt(squares_C + 1e-12))
  return [d * scale_C[:, None] for d in deltas]


def log_gate(p: Array) -> Array:
  """log p for a gate p in [0, 1], floored so that p = 0 gives a finite log (zero gradient)."""
  return jnp.log(jnp.maximum(p, jnp.finfo(jnp.float32).tiny))


def segment_sums(log_C: Array) -> Array:
  """S[t, u] = sum of log_C over (u, t] for u <= t, else -inf (Mamba-2's segsum)."""
  size = log_C.shape[0]
  t, u = jnp.arange(size)[:, None], jnp.arange(size)[None, :]
  sums_CC = jnp.cumsum(jnp.where(t > u, log_C[:, None], 0.0), axis=0)
  return jnp.where(t >= u, sums_CC, -jnp.inf)


def memory_chunk(state, chunk, max_grad_norm: float = 0.0):
  """One chunk for one head.

  (M_c, S_c), (q, k, v, eta, theta, alpha) -> (M, S at the chunk's end), reads.
  """
  weights, surprise = state
  q_CH, k_CH, v_CH, eta_C, theta_C, alpha_C = chunk
  ins, deltas = token_gradients(weights, k_CH, v_CH)
  deltas = clip_gradients(ins, deltas, max_grad_norm)
  log_keep_C, log_eta_C = log_gate(1 - alpha_C), log_gate(eta_C)
  forget_CC = jnp.exp(segment_sums(log_keep_C))  # prod of (1 - alpha) over (u, t]
  carry_CC = jnp.exp(segment_sums(log_eta_C))  # prod of eta over (u, t]
  a_C = jnp.exp(jnp.cumsum(log_keep_C))  # weight of M_c in M_t
  momentum_C = jnp.exp(jnp.cumsum(log_eta_C))  # weight of S_c in S_t
  b_C = forget_CC @ momentum_C  # weight of S_c in M_t
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
    momentum_C[-1] * s - ins[l].T @ (last_surprise_C[:, None] * deltas[l])
    for l, s in enumerate(surprise)
  ]
  return (new_weights, new_surprise), h


def memory_scan(
  state: tuple[list[Array], list[Array]],
  q_TH: Array,
  k_TH: Array,
  v_TH: Array,
  eta_T: Array,
  theta_T: Array,
  alpha_T: Array,
  chunk_size: int,
  unroll: bool = False,
  max_grad_norm: float = 0.0,
  remat_chunks: int = 0,
  keep_K: Array | None = None,
) -> tuple[tuple[list[Array], list[Array]], Array]:
  """One head over a sequence (T divisible by chunk_size) from state (M, S).

  Returns the state at the end and the reads y_t = M_t(q_t). Everything is
  differentiable, so the outer model learns the initial memory, the
  projections and the gates through the inner updates. max_grad_norm caps
  each token's inner gradient (0: the paper's uncapped rule).

  keep_K: per chunk, whether its end state is kept (a chunk not kept reads from the state
  as it finds it and leaves it unchanged; decode's partial and padding chunks); None: all.
  remat_chunks=G > 0 scans over groups of G chunks, each group under jax.checkpoint: the
  backward pass keeps the float32 state only at group boundaries and recomputes a group's
  chunks from its boundary, holding about K/G + G chunk states instead of K (and, between
  a layer's forward and backward pass, none of its chunks' intermediates). A last partial
  group is filled with zero chunks that are not kept.
  """
  length = q_TH.shape[0]
  chunks = length // chunk_size
  xs = tuple(
    x.reshape(chunks, chunk_size, *x.shape[1:]) for x in (q_TH, k_TH, v_TH, eta_T, theta_T, alpha_T)
  )
  group = min(remat_chunks, chunks)
  pad = -chunks % group if group else 0
  if pad:
    keep_K = jnp.arange(chunks + pad) < chunks if keep_K is None else jnp.pad(keep_K, (0, pad))
    xs = tuple(jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1)) for x in xs)

  def step(state, chunk_keep):
    chunk, keep = chunk_keep
    new, y_CH = memory_chunk(state, chunk, max_grad_norm)
    if keep is not None:
      new = jax.tree.map(lambda n, o: jnp.where(keep, n, o), new, state)
    return new, y_CH

  run = lambda state, chunks_keep: jax.lax.scan(step, state, chunks_keep, unroll=unroll)
  if not group:
    state, y = run(state, (xs, keep_K))
  else:
    by_group = lambda x: x.reshape(-1, group, *x.shape[1:])
    grouped = jax.tree.map(by_group, (xs, keep_K))
    state, y = jax.lax.scan(jax.checkpoint(run, prevent_cse=False), state, grouped, unroll=unroll)
  return state, y.reshape(-1, y.shape[-1])[:length]


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
  """Reads of one head's memory started at weights0 with zero surprise."""
  state = (list(weights0), [jnp.zeros_like(w) for w in weights0])
  return memory_scan(state, q_TH, k_TH, v_TH, eta_T, theta_T, alpha_T, chunk_size)[1]


def multihead_memory_scan(
  state: tuple[list[Array], list[Array]],
  q_BTNH: Array,
  k_BTNH: Array,
  v_BTNH: Array,
  eta_BTN: Array,
  theta_BTN: Array,
  alpha_BTN: Array,
  chunk_size: int,
  unroll: bool = False,
  max_grad_norm: float = 0.0,
  remat_chunks: int = 0,
  keep_K: Array | None = None,
) -> tuple[tuple[list[Array], list[Array]], Array]:
  """memory_scan over (batch, heads); state leaves are (B, N, in, out), reads (B, T, N, H)."""
  scan = functools.partial(
    memory_scan,
    chunk_size=chunk_size,
    unroll=unroll,
    max_grad_norm=max_grad_norm,
    remat_chunks=remat_chunks,
    keep_K=keep_K,
  )
  per_head = jax.vmap(scan, in_axes=(0,) + (1,) * 6, out_axes=(0, 1))
  return jax.vmap(per_head)(state, q_BTNH, k_BTNH, v_BTNH, eta_BTN, theta_BTN, alpha_BTN)


def multihead_read(weights: list[Array], q_BTNH: Array) -> Array:
  """Reads M(q) without an update; weight leaves (B, N, in, out), reads (B, T, N, H)."""
  return jax.vmap(jax.vmap(mlp_apply, in_axes=(0, 1), out_axes=1))(weights, q_BTNH)


def l2_normalize(x: Array) -> Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-6)


def pad_time(x_BT: Array, before: int, after: int = 0) -> Array:
  """Zeros before and after the time axis (axis 1)."""
  return jnp.pad(x_BT, [(0, 0), (before, after)] + [(0, 0)] * (x_BT.ndim - 2))


class NeuralMemory(nnx.Module):
  """Multi-head Titans memory: q/k/v projections, causal conv and SiLU, gates, chunked
  memory, and an output that passes a norm and a learned gate before its projection.

  eta (momentum), theta (inner learning rate, at most titans.max_inner_lr)
  and alpha (forgetting) are sigmoids of per-head linear maps of x_t. The
  initial memory weights are ordinary parameters, learned by the outer loop.
  Output: w_o(RMSNorm(y) * SiLU(x W_gate)), the norm over each head's
  channels with one learned scale shared by the heads; the paper says "norm
  and gating with a linear layer" without the non-linearity: SiLU as in
  Gated DeltaNet's output gate, the recipe Titans follows.
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    d, n, h = spec.d_model, spec.num_heads, spec.head_dim
    pdt, std = jnp.dtype(spec.param_dtype), spec.init_std
    for name in ("w_q", "w_k", "w_v", "w_gate"):
      setattr(self, name, param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pdt))
    identity = jnp.zeros((CONV_WIDTH, n, h), pdt).at[0].set(1.0)  # convs start as identity
    for name in ("conv_q", "conv_k", "conv_v"):
      setattr(self, name, nnx.Param(identity, logical_axes=(None, "heads", "head_dim")))
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
    self.out_norm = RMSNorm(h, spec.norm_eps, pdt)
    self.w_o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), output_std(spec), pdt)
    self.chunk_size, self.max_inner_lr = spec.titans.chunk_size, spec.titans.max_inner_lr
    self.unroll, self.max_grad_norm = spec.titans.unroll, spec.titans.max_grad_norm
    self.remat_chunks = spec.titans.remat_chunks
    self.dtype = jnp.dtype(spec.dtype)

  def project(
    self,
    x_BTD: Array,
    names: str,
    tails: dict[str, Array] | None = None,
    count: Array | None = None,
  ) -> tuple[dict[str, Array], dict[str, Array]]:
    """SiLU(conv(x W_name)) for each name in `names` (of "qkv"), q and k L2-normalised,
    float32 (B, T, N, H): one einsum and one conv for them all (a third of the ops to
    compile that a projection each takes).

    tails: per name the 3 pre-conv rows before x (a previous call's), zeros if None.
    Returns the projections and the new tails by name: the 3 pre-conv rows before row
    `count` of x (None: the last 3).
    """
    stacked = lambda prefix: jnp.stack(
      [getattr(self, f"{prefix}_{n}")[...].astype(self.dtype) for n in names], axis=1
    )
    kernel_WKNH = stacked("conv")
    y_BTKNH = jnp.einsum("btd,dknh->btknh", x_BTD.astype(self.dtype), stacked("w"))
    width, length = kernel_WKNH.shape[0] - 1, x_BTD.shape[1]
    if tails is None:
      tail_BWKNH = jnp.zeros((y_BTKNH.shape[0], width, *y_BTKNH.shape[2:]), y_BTKNH.dtype)
    else:
      tail_BWKNH = jnp.stack([tails[n].astype(y_BTKNH.dtype) for n in names], axis=2)
    full_BTKNH = jnp.concatenate([tail_BWKNH, y_BTKNH], axis=1)
    conv_BTKNH = sum(
      kernel_WKNH[j] * full_BTKNH[:, width - j : width - j + length] for j in range(width + 1)
    )
    out_BTKNH = jax.nn.silu(conv_BTKNH.astype(jnp.float32))
    rows = {n: out_BTKNH[:, :, i] for i, n in enumerate(names)}
    rows.update({n: l2_normalize(rows[n]) for n in names if n != "v"})
    tail_BWKNH = jax.lax.dynamic_slice_in_dim(
      full_BTKNH, length if count is None else count, width, 1
    )
    return rows, {n: tail_BWKNH[:, :, i] for i, n in enumerate(names)}

  def gates(self, x_BTD: Array) -> tuple[Array, Array, Array]:
    """eta, theta, alpha, float32 (B, T, N): one einsum for the three."""
    names = ("eta", "theta", "alpha")
    w_DKN = jnp.stack([getattr(self, f"w_{n}")[...].astype(self.dtype) for n in names], axis=1)
    b_KN = jnp.stack([getattr(self, f"b_{n}")[...] for n in names])
    logits_BTKN = jnp.einsum("btd,dkn->btkn", x_BTD.astype(self.dtype), w_DKN)
    eta_BTN, theta_BTN, alpha_BTN = jnp.moveaxis(
      jax.nn.sigmoid(logits_BTKN.astype(jnp.float32) + b_KN), 2, 0
    )
    return eta_BTN, self.max_inner_lr * theta_BTN, alpha_BTN

  def rows(
    self, x_BTD: Array, tails: dict[str, Array] | None = None, count: Array | None = None
  ) -> tuple[tuple, dict]:
    """The memory's (q, k, v, eta, theta, alpha) rows of x, and the new conv tails (see
    project)."""
    projected, tails = self.project(x_BTD, "qkv", tails, count)
    return tuple(projected[n] for n in "qkv") + self.gates(x_BTD), tails

  def recomputed(self, f: Callable, **checkpoint_options) -> Callable:
    """f, under jax.checkpoint when the memory is rematerialised (remat_chunks > 0): the
    backward pass then recomputes f's activations instead of a layer keeping them."""
    return jax.checkpoint(f, **checkpoint_options) if self.remat_chunks else f

  @property
  def scan_options(self) -> dict:
    return dict(
      chunk_size=self.chunk_size,
      unroll=self.unroll,
      max_grad_norm=self.max_grad_norm,
      remat_chunks=self.remat_chunks,
    )

  def initial_state(self, batch: int) -> tuple[list[Array], list[Array]]:
    """The learned initial memory for each sequence, zero surprise: leaves (B, N, in, out)."""
    weights = [jnp.broadcast_to(w[...].astype(jnp.float32), (batch, *w.shape)) for w in self.memory]
    return weights, [jnp.zeros_like(w) for w in weights]

  def scan(
    self, state: tuple[list[Array], list[Array]], x_BTD: Array, tails: dict[str, Array]
  ) -> tuple[tuple[list[Array], list[Array]], dict[str, Array], Array]:
    """Memory steps over x (whole chunks) from `state`, and the reads before `output`.

    tails: the conv tails per name q, k, v (a previous call's, or zeros).
    Returns (state, tails, reads (B, T, N, H)).
    """
    rows, tails = self.rows(x_BTD, tails)
    state, y_BTNH = multihead_memory_scan(state, *rows, **self.scan_options)
    return state, tails, y_BTNH

  def output(self, y_BTNH: Array, x_BTD: Array) -> Array:
    """w_o(norm(y) * SiLU(x W_gate)): reads back to the model width, gated by their input x."""
    gate_BTNH = jnp.einsum(
      "btd,dnh->btnh", x_BTD.astype(self.dtype), self.w_gate[...].astype(self.dtype)
    )
    gated_BTNH = (self.out_norm(y_BTNH) * jax.nn.silu(gate_BTNH)).astype(self.dtype)
    return jnp.einsum("btnh,nhd->btd", gated_BTNH, self.w_o[...].astype(self.dtype))

  def init_cache(self, batch: int, prefix_BPD: Array | None = None) -> dict:
    """The state where the sequence's first chunk starts (after the prefix tokens, run as
    __call__ runs them), the conv tails, and an empty buffer for the current chunk's
    (q, k, v, eta, theta, alpha) rows, `n` of them filled."""
    heads, dim = self.w_q.shape[1:]
    state = self.initial_state(batch)
    tails = {name: jnp.zeros((batch, CONV_WIDTH - 1, heads, dim), self.dtype) for name in "qkv"}
    if prefix_BPD is not None:
      pad = -prefix_BPD.shape[1] % self.chunk_size
      rows, tails = self.rows(prefix_BPD)
      padded = [pad_time(a, pad) for a in rows]
      state, _ = multihead_memory_scan(state, *padded, **self.scan_options)
    rows_BCNH = jnp.zeros((batch, self.chunk_size, heads, dim), jnp.float32)
    buffer = (rows_BCNH,) * 3 + (rows_BCNH[..., 0],) * 3
    return dict(state=state, tails=tails, buffer=buffer, n=jnp.zeros((), jnp.int32))

  def decode(self, x_BTD: Array, cache: dict, count: Array | None = None) -> tuple[Array, dict]:
    """__call__'s outputs for the next T tokens of the sequence, through the chunk closed
    forms training uses. count: only the first `count` of the T rows are tokens (traced; the
    outputs at the others are not defined and they leave the cache as it is).

    The current chunk's n buffered rows and the T new rows are laid out from the chunk's
    start in whole chunks (n + T rows and the rest filled with stale or zero rows, all
    finite), and scanned from the chunk's start state, which is kept after each full chunk
    only: the reads of row r depend on rows <= r alone (the decay and mix matrices are
    lower-triangular). The rows of the last partial chunk are the next buffer. A call costs
    ceil((T + C - 1) / C) chunk closed forms, one for a single token.
    """
    size, length, n = self.chunk_size, x_BTD.shape[1], cache["n"]
    count = length if count is None else count
    rows, tails = self.rows(x_BTD, cache["tails"], count)
    span = size * -(-(length + size - 1) // size)  # whole chunks that hold n + T rows, any n
    layout = tuple(
      jax.lax.dynamic_update_slice_in_dim(pad_time(b, 0, span - size), r, n, axis=1)
      for b, r in zip(cache["buffer"], rows)
    )
    end = n + count
    full_K = (jnp.arange(span // size) + 1) * size <= end
    state, y_BLNH = multihead_memory_scan(
      cache["state"], *layout, size, max_grad_norm=self.max_grad_norm, keep_K=full_K
    )
    # The last partial chunk's rows (clamped into the layout when none: then any rows do).
    buffer = tuple(jax.lax.dynamic_slice_in_dim(a, end // size * size, size, 1) for a in layout)
    cache = dict(state=state, tails=tails, buffer=buffer, n=end % size)
    return self.output(jax.lax.dynamic_slice_in_dim(y_BLNH, n, length, 1), x_BTD), cache

  def __call__(self, x_BSD: Array, prefix: int = 0) -> Array:
    """Outputs at every position of x = [prefix tokens | sequence], the memory learning from
    all of them in order; the prefix and the sequence of any length.

    Neutral tokens (inner lr 0, no forgetting) go before the prefix so that the sequence
    starts a chunk: they leave the initial memory and the zero surprise as they are; more
    after the sequence fill its last chunk, whose reads depend on earlier rows only.
    """
    batch, length = x_BSD.shape[:2]
    before, after = -prefix % self.chunk_size, -(length - prefix) % self.chunk_size
    rows = self.recomputed(lambda x: self.rows(x)[0])
    padded = [pad_time(a, before, after) for a in rows(x_BSD)]
    _, y_BSNH = multihead_memory_scan(self.initial_state(batch), *padded, **self.scan_options)
    return self.recomputed(self.output)(y_BSNH[:, before : before + length], x_BSD)


class Titans(nnx.Module):
  """A Titans token mixer: the neural memory with attention, `titans.variant` says how.

  Persistent memory (`model.persistent_tokens` = P): learned tokens p, input-
  independent, prepended to the sequence, x~ = [p | x], and seen by both
  branches (mac: by every segment's attention, and by the memory through the
  attention's output, as in the paper); outputs at their positions are
  dropped. They sit at the positions just before the sequence (RoPE) and every
  query sees them (the paper's sliding-window attention "with prefix").
  mag (memory as a gate): y = SWA(x~), m = M(x~), out = norm(y) * sigmoid(norm(m)), each norm
    with its own learned vector weight (the paper: y (x) M(x~) after normalising both with
    learnable vector-valued weights and a non-linearity; the sigmoid makes the memory the
    gate). titans.mag_combine="mix" gives the earlier convex mix g(x) y + (1 - g(x)) m.
  mal (memory as a layer): y = M(x~), out = SWA(y), so attention reads only the memory's
    output; the residual is the block's (x + out).
  mac (memory as context): segments of titans.segment_size tokens, in order. For
    segment i, with the memory as left by segments < i:
      h = memory read of the segment's queries (no update yet);
      y = attention of the segment's tokens over [p | h | segment] (token t sees p and
          h_s, x_s for s <= t in its segment: attention is segment-local, the memory
          carries the past);
      the memory steps (chunks of titans.chunk_size) over y's keys and values, and
      out = y (x) memory read of y, combined as in mag.
  SWA: sliding-window attention of model.attention_window tokens (0: full causal).
  Decoding (init_cache, decode) runs the next T tokens through the chunk closed forms
  training uses, a memory chunk at a time from the last chunk boundary (where the state is
  kept, with the current chunk's rows), so a prompt of T tokens costs about T / chunk_size
  chunks, a single token one.
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    titans, d, pdt = spec.titans, spec.d_model, jnp.dtype(spec.param_dtype)
    self.variant, self.segment_size, self.unroll = (
      titans.variant,
      titans.segment_size,
      titans.unroll,
    )
    self.mix = titans.variant == "mag" and titans.mag_combine == "mix"
    self.window = spec.attention_window
    self.memory = NeuralMemory(spec, rngs=rngs)
    self.attention = Attention(dataclasses.replace(spec, persistent_tokens=0), rngs=rngs)
    self.persistent = (
      param(rngs, (spec.persistent_tokens, d), (None, "embed"), spec.init_std, pdt)
      if spec.persistent_tokens
      else None
    )
    if self.mix:
      self.w_mix = param(rngs, (d, d), ("embed", None), spec.init_std, pdt)
      self.b_mix = nnx.Param(jnp.zeros((d,), pdt), logical_axes=(None,))
    elif self.variant in ("mag", "mac"):
      # The output's weight starts at init_std, so a layer's update starts as small as a
      # projection's: at 1 every layer adds ~0.5 RMS from the first step, and the tiny MAG /
      # MAC configs trained 0.1 / 0.2 bits per byte worse in 150 steps.
      self.attention_norm = RMSNorm(d, spec.norm_eps, pdt)
      self.attention_norm.scale[...] = jnp.full((d,), spec.init_std, pdt)
      self.memory_norm = RMSNorm(d, spec.norm_eps, pdt)

  def __call__(self, x_BTD: Array, positions_BT: Array) -> Array:
    if self.variant == "mac":
      return self.memory_as_context(x_BTD, positions_BT)
    length, prefix = x_BTD.shape[1], self.prefix_length
    x_BSD, positions_BS = self.with_prefix(x_BTD, positions_BT)
    mask_TS = attention_mask(length, prefix, self.window)
    if self.variant == "mal":
      m_BSD = self.memory(x_BSD, prefix)
      return self.attend(m_BSD[:, prefix:], m_BSD, positions_BT, positions_BS, mask_TS)
    y_BTD = self.attend(x_BTD, x_BSD, positions_BT, positions_BS, mask_TS)
    m_BTD = self.memory(x_BSD, prefix)[:, prefix:]
    return self.memory.recomputed(self.combine)(y_BTD, m_BTD, x_BTD)

  @property
  def prefix_length(self) -> int:
    return 0 if self.persistent is None else self.persistent.shape[0]

  def persistent_rows(self, batch: int, dtype: jnp.dtype) -> Array:
    """The persistent tokens for each sequence, (B, P, D)."""
    return jnp.broadcast_to(self.persistent[...].astype(dtype), (batch, *self.persistent.shape))

  def with_prefix(self, x_BTD: Array, positions_BT: Array) -> tuple[Array, Array]:
    """[persistent | x] and its positions, the persistent tokens just before x's first."""
    if self.persistent is None:
      return x_BTD, positions_BT
    p_positions_BP = positions_BT[:, :1] + jnp.arange(-self.prefix_length, 0)
    return (
      jnp.concatenate([self.persistent_rows(x_BTD.shape[0], x_BTD.dtype), x_BTD], axis=1),
      jnp.concatenate([p_positions_BP, positions_BT], axis=1),
    )

  def attend(self, x_BTD, context_BSD, positions_BT, context_positions_BS, mask_TS) -> Array:
    y_BTNH = self.attention.attend_context(
      x_BTD, context_BSD, positions_BT, context_positions_BS, mask_TS
    )
    return self.attention.project(y_BTNH)

  def combine(self, y_BTD: Array, m_BTD: Array, x_BTD: Array) -> Array:
    """The attention output y (x) the memory's m (the paper's), or the convex mix by x."""
    if self.mix:
      dtype = y_BTD.dtype
      logits = x_BTD.astype(dtype) @ self.w_mix[...].astype(dtype) + self.b_mix[...].astype(dtype)
      g_BTD = jax.nn.sigmoid(logits)
      return g_BTD * y_BTD + (1 - g_BTD) * m_BTD
    return self.attention_norm(y_BTD) * jax.nn.sigmoid(self.memory_norm(m_BTD))

  def init_cache(self, batch: int, length: int) -> dict:
    """mag, mal: the memory's cache (the persistent tokens already learned from), attention's
    key/value slots for `length` tokens, and `prefix_BPD`, the rows every query attends to
    (the persistent tokens; mal: the memory's outputs at them). Sequences start at 0."""
    if self.variant == "mac":
      return self.init_context_cache(batch)
    cache = dict(attention=self.attention.init_cache(batch, length))
    if self.persistent is None:
      return dict(cache, memory=self.memory.init_cache(batch))
    p_BPD = self.persistent_rows(batch, self.memory.dtype)
    prefix_BPD = self.memory(p_BPD, self.prefix_length) if self.variant == "mal" else p_BPD
    return dict(cache, memory=self.memory.init_cache(batch, p_BPD), prefix_BPD=prefix_BPD)

  def decode(self, x_BTD: Array, positions_BT: Array, cache: dict) -> tuple[Array, dict]:
    """__call__ at the next T tokens of the sequence, the memory in chunks (its decode)."""
    if self.variant == "mac":
      return self.decode_as_context(x_BTD, positions_BT, cache)
    new, prefix = dict(cache), {}
    if "prefix_BPD" in cache:
      positions_BP = jnp.broadcast_to(
        jnp.arange(-self.prefix_length, 0), cache["prefix_BPD"].shape[:2]
      )
      prefix = dict(prefix_BPD=cache["prefix_BPD"], prefix_positions_BP=positions_BP)
    if self.variant == "mal":
      m_BTD, new["memory"] = self.memory.decode(x_BTD, cache["memory"])
      y_BTD, new["attention"] = self.attention.decode(
        m_BTD, positions_BT, cache["attention"], **prefix
      )
      return y_BTD, new
    y_BTD, new["attention"] = self.attention.decode(
      x_BTD, positions_BT, cache["attention"], **prefix
    )
    m_BTD, new["memory"] = self.memory.decode(x_BTD, cache["memory"])
    return self.combine(y_BTD, m_BTD, x_BTD), new

  def init_context_cache(self, batch: int) -> dict:
    """mac: the q conv tail of x, the memory weights at the segment's start, the segment's h
    and x rows so far (`i` of them), and the cache of the memory that steps over y."""
    mem = self.memory
    memory = mem.init_cache(batch)
    rows_BSD = jnp.zeros((batch, self.segment_size, self.attention.w_q.shape[0]), mem.dtype)
    return dict(
      q_tail=memory["tails"]["q"],
      start_weights=memory["state"][0],
      h_BSD=rows_BSD,
      x_BSD=rows_BSD,
      i=jnp.zeros((), jnp.int32),
      memory=memory,
    )

  def decode_as_context(self, x_BTD: Array, positions_BT: Array, cache: dict) -> tuple[Array, dict]:
    """memory_as_context for the next T tokens, in pieces that end where memory chunks end
    (so never across a segment's end): each piece's tokens read h from the weights at their
    segment's start, attend over [p | h | x] of the segment up to themselves, and the memory
    decodes their y (NeuralMemory.decode). The pieces are windows of min(T, C) tokens, the
    tokens past a piece's end masked out: a prompt costs about what __call__ costs, a single
    token one query and one memory chunk."""
    mem, segment, prefix = self.memory, self.segment_size, self.prefix_length
    size, length, i = mem.chunk_size, x_BTD.shape[1], cache["i"]
    n, window = i % size, min(length, size)
    pieces = -(-(length + size - 1) // size)
    projected, q_tails = mem.project(x_BTD, "q", dict(q=cache["q_tail"]))
    padding = (pieces - 1) * size + window - length  # no window runs past the end
    x_BLD, q_BLNH = pad_time(x_BTD, 0, padding), pad_time(projected["q"], 0, padding)
    starts_K = jnp.maximum(0, size * jnp.arange(pieces) - n)  # each piece's first token
    counts_K = jnp.clip(jnp.minimum(length, size * jnp.arange(1, pieces + 1) - n) - starts_K, 0)
    segment_start_B1 = positions_BT[:, :1] - i  # position of the current segment's first row
    keys_S, rows_W = jnp.arange(segment), jnp.arange(window)
    keep = lambda flag, new, old: jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)

    def piece(carry, start_count):
      start_weights, h_BSD, x_BSD, memory = carry
      start, count = start_count
      x_BWD = jax.lax.dynamic_slice_in_dim(x_BLD, start, window, 1)
      q_BWNH = jax.lax.dynamic_slice_in_dim(q_BLNH, start, window, 1)
      first = i + start  # the piece's first token, counted from the current segment's start
      row = first % segment  # ... in its own segment
      weights = keep(row == 0, memory["state"][0], start_weights)
      h_BWD = mem.output(multihead_read(weights, q_BWNH), x_BWD)
      new_W1 = (rows_W < count)[:, None]

      def write(rows_BSD, new_BWD):  # the piece's tokens into the segment's rows
        rows_BPD = pad_time(rows_BSD, 0, window)
        old_BWD = jax.lax.dynamic_slice_in_dim(rows_BPD, row, window, 1)
        new_BWD = jnp.where(new_W1, new_BWD, old_BWD).astype(rows_BSD.dtype)
        return jax.lax.dynamic_update_slice_in_dim(rows_BPD, new_BWD, row, 1)[:, :segment]

      h_BSD, x_BSD = write(h_BSD, h_BWD), write(x_BSD, x_BWD)
      positions_BS = segment_start_B1 + first - row + keys_S
      context_BSD, context_pos_BS = self.with_prefix(
        jnp.concatenate([h_BSD, x_BSD], 1), jnp.concatenate([positions_BS, positions_BS], 1)
      )
      seen_WS = keys_S <= row + rows_W[:, None]
      mask_WS = jnp.concatenate([jnp.ones((window, prefix), bool), seen_WS, seen_WS], axis=1)
      positions_BW = segment_start_B1 + first + rows_W
      y_BWD = self.attend(x_BWD, context_BSD, positions_BW, context_pos_BS, mask_WS)
      m_BWD, memory = mem.decode(y_BWD, memory, count)
      out_BWD = self.combine(y_BWD, m_BWD, x_BWD)
      return (keep(count > 0, weights, start_weights), h_BSD, x_BSD, memory), out_BWD

    carry = (cache["start_weights"], cache["h_BSD"], cache["x_BSD"], cache["memory"])
    carry, out_KBWD = jax.lax.scan(piece, carry, (starts_K, counts_K))
    start_weights, h_BSD, x_BSD, memory = carry
    tokens_T = jnp.arange(length)
    piece_T = (tokens_T + n) // size
    out_TBD = out_KBWD[piece_T, :, tokens_T - starts_K[piece_T]]
    cache = dict(
      q_tail=q_tails["q"],
      start_weights=start_weights,
      h_BSD=h_BSD,
      x_BSD=x_BSD,
      i=(i + length) % segment,
      memory=memory,
    )
    return jnp.moveaxis(out_TBD, 0, 1), cache

  def memory_as_context(self, x_BTD: Array, positions_BT: Array) -> Array:
    """Any length: the last segment is filled with zero tokens, which only later tokens of
    that segment and the memory after it (both dropped) see."""
    mem, size, prefix = self.memory, self.segment_size, self.prefix_length
    length = x_BTD.shape[1]
    pad = -length % size
    x_BTD = pad_time(x_BTD, 0, pad)
    positions_BT = jnp.pad(positions_BT, ((0, 0), (0, pad)), mode="edge")
    batch, padded_length, dim = x_BTD.shape
    q_BTNH = mem.project(x_BTD, "q")[0]["q"]
    causal = jnp.tril(jnp.ones((size, size), bool))
    mask_CS = jnp.concatenate([jnp.ones((size, prefix), bool), causal, causal], axis=1)

    def segment(carry, seg):
      state, tails = carry
      x_BCD, q_BCNH, pos_BC = seg
      h_BCD = mem.output(multihead_read(state[0], q_BCNH), x_BCD)
      context_BSD, context_pos_BS = self.with_prefix(
        jnp.concatenate([h_BCD, x_BCD], 1), jnp.concatenate([pos_BC, pos_BC], 1)
      )
      y_BCD = self.attend(x_BCD, context_BSD, pos_BC, context_pos_BS, mask_CS)
      state, tails, out_BCNH = mem.scan(state, y_BCD, tails)
      return (state, tails), self.combine(y_BCD, mem.output(out_BCNH, y_BCD), x_BCD)

    def by_segment(a):
      return jnp.moveaxis(a.reshape(batch, padded_length // size, size, *a.shape[2:]), 1, 0)

    segments = tuple(map(by_segment, (x_BTD, q_BTNH, positions_BT)))
    tails = {n: jnp.zeros((batch, CONV_WIDTH - 1, *q_BTNH.shape[2:]), mem.dtype) for n in "qkv"}
    carry = (mem.initial_state(batch), tails)
    # A segment's attention and memory scan are recomputed on the backward pass.
    segment = mem.recomputed(segment, prevent_cse=False)
    _, out = jax.lax.scan(segment, carry, segments, unroll=self.unroll)
    return jnp.moveaxis(out, 0, 1).reshape(batch, padded_length, dim)[:, :length]
