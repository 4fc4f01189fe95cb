"""Hope-attention's Continuum Memory System (CMS, from "Nested Learning", Behrouz et al. 2025).

Hope-attention is softmax attention followed by a CMS in place of the MLP: a
chain of SwiGLU levels, u_{k+1} = u_k + MLP_k(u_k), where level k runs at its
own frequency. The paper leaves the in-context objective open; ours, per level
k with chunk size C_k > 0 (`model.hope.chunk_sizes`):

  - tokens are cut into chunks of C_k (a sequence of any length: the last
    chunk may be partial); every token of chunk j is processed with the
    weights W_k^(j);
  - after chunk j, one step on the chunk's associative loss, summed over its
    tokens as the paper's CMS update sums its per-token terms over the C_k
    tokens since the last update:
        l(W) = sum_t 0.5 * || MLP_W(u_t) - u_t V_k ||^2
        W_k^(j+1) = W_k^(j) - clip(eta_k * grad l(W_k^(j)))
    eta_k (`model.hope.inner_lrs`) is a per-token step size: a mean over the
    chunk would shrink a level's step by 1/C_k merely for updating less often.
    V_k is a learned d x d value map (the outer model decides what is stored);
  - clip is a trust region (`model.hope.max_step`): each weight matrix moves
    by at most max_step times its own norm per update. Without it, the tiny
    config diverged at lr 3e-3: the inner loss is a polynomial of degree 6 in
    the weights, so its curvature grows with the weights the outer loop
    learns, until a fixed step overshoots, the overshoot grows the weights,
    and a level's outputs blow up within one sequence (measured: from outer
    step 13 some chunks' inner steps raised their loss, by up to 7e5 in one
    step, and the training loss was NaN at step 24; a smaller fixed step only
    delayed it, to step 60);
  - W_k^(0) are ordinary parameters, so the outer loss trains the starting
    point and V_k through the inner steps.
A level with chunk size 0 is never updated in context: ordinary weights, the
slowest level. Weights used in chunk j depend only on tokens of earlier
chunks, so the system is causal.

Precision: the levels compute in `model.dtype` like the rest of the model;
the in-context weights are carried in float32 between chunks (small updates
would vanish in bfloat16), and the error terms are formed in float32.

Memory: the backward pass needs the weights every chunk used, a float32 copy
of the level per chunk per sequence (chunk 16 at 1024 tokens: 64 copies, with
each chunk's inner-step intermediates). With `model.hope.remat_chunks` = G > 0
a level scans over groups of G chunks, each group under jax.checkpoint
(`scan_chunks`): the forward pass keeps only the weights at group boundaries,
and the backward pass recomputes a group's chunks from its boundary, one group
at a time, for one more forward pass of the in-context levels. Training never
keeps per-chunk weights (`weights_per_chunk` gives them to tests and analyses).

Decoding continues a sequence by T tokens in whole chunks through the same
closed form (`level_decode`): a level's buffered tokens of its unfinished
chunk and the T new ones are laid out together, every chunk they complete
takes its step, and the rest stays buffered; so a prompt of T tokens costs
about T / C_k chunk steps, not T token steps, from any position.

The taper sets the total width of the layer's CMS; `costs.level_widths`
splits it over the levels: each in-context level gets its width fraction
rounded to `model.hope.level_tile`, the slow level the rest. So widths keep
the taper's own tile steps, and the parameter count depends on the total
width only (tapered and uniform twins hold exactly the same). FLOPs depend on
the split (in-context levels cost more per unit of width); they match the
uniform twin's exactly for tapers antisymmetric about the middle layer
(cosine, linear, sigmoid, reverse) and to about 2% otherwise (`taper` shows it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax.model.costs import level_widths
from tlm_jax.model.layers import mlp_output_std, param
from tlm_jax.spec import ModelSpec

Array = jax.Array
Weights = tuple[Array, Array, Array]


def swiglu(weights: Weights, u_TD: Array) -> Array:
  w_gate_DF, w_up_DF, w_down_FD = weights
  return (jax.nn.silu(u_TD @ w_gate_DF) * (u_TD @ w_up_DF)) @ w_down_FD


def associative_loss(weights: Weights, u_CD: Array, w_value: Array) -> Array:
  """The level's in-context objective over one chunk, summed over its tokens."""
  return 0.5 * jnp.sum((swiglu(weights, u_CD) - u_CD @ w_value) ** 2)


def safe_norm(x: Array) -> Array:
  """Frobenius norm whose gradient at x = 0 is 0, not NaN (sqrt's slope is infinite there)."""
  squares = jnp.sum(x * x)
  nonzero = squares > 0
  return jnp.where(nonzero, jnp.sqrt(jnp.where(nonzero, squares, 1.0)), 0.0)


def trust_region(w: Array, step: Array, max_step: float) -> Array:
  """`step` scaled down to at most max_step * ||w|| (Frobenius); max_step 0: unchanged.

  The outer gradient flows through the scale too: holding it constant (cheaper, ~3x on
  the level's CPU backward) trained the tiny config to 4.5 bits/byte instead of 3.7.
  A zero step (inner lr 0, the no-in-context control; a chunk of padding) stays zero, with
  finite gradients: `safe_norm`.
  """
  if not max_step:
    return step
  ratio = max_step * safe_norm(w) / jnp.maximum(safe_norm(step), 1e-30)
  return step * jnp.minimum(1.0, ratio)


def level_step(
  weights: Weights, u_CD: Array, v_CD: Array, inner_lr: float, max_step: float
) -> tuple[Array, Weights]:
  """One chunk through a level: its outputs with `weights` (float32, run in u's dtype), and
  the weights after the chunk's inner step. The forward pass serves both (one vjp)."""
  y_CD, pullback = jax.vjp(lambda w: swiglu(w, u_CD), tuple(w.astype(u_CD.dtype) for w in weights))
  (grads,) = pullback((y_CD.astype(jnp.float32) - v_CD).astype(u_CD.dtype))
  new = tuple(
    w - trust_region(w, inner_lr * g.astype(jnp.float32), max_step) for w, g in zip(weights, grads)
  )
  return y_CD, new


def scan_chunks(
  weights: Weights,
  u_NCD: Array,
  v_NCD: Array,
  inner_lr: float,
  max_step: float,
  unroll: bool = False,
  remat_chunks: int = 0,
) -> tuple[Weights, Array]:
  """N whole chunks through a level: the weights after the last, and the outputs (N, C, D).

  remat_chunks=G > 0 scans over groups of G chunks, each group under jax.checkpoint: the
  forward pass keeps the float32 weights only at the ceil(N / G) group boundaries, and the
  backward pass recomputes one group's chunks (and their inner steps) at a time from its
  boundary, so it holds about N / G + G chunks' weights and intermediates instead of N.
  The last N mod G chunks are one more group; G >= N: one group.
  """

  def chunk(weights, u_v):
    y_CD, new = level_step(weights, *u_v, inner_lr, max_step)
    return new, y_CD

  run = lambda weights, chunks: jax.lax.scan(chunk, weights, chunks, unroll=unroll)
  count = u_NCD.shape[0]
  if not remat_chunks or not count:
    return run(weights, (u_NCD, v_NCD))
  group = jax.checkpoint(run)
  whole, ys = count // remat_chunks * remat_chunks, []
  if whole:
    grouped = lambda a: a[:whole].reshape(-1, remat_chunks, *a.shape[1:])
    weights, y_GKCD = jax.lax.scan(group, weights, (grouped(u_NCD), grouped(v_NCD)), unroll=unroll)
    ys.append(y_GKCD.reshape(whole, *u_NCD.shape[1:]))
  if whole < count:
    weights, y_rest = group(weights, (u_NCD[whole:], v_NCD[whole:]))
    ys.append(y_rest)
  return weights, jnp.concatenate(ys)


def in_context_level(
  weights0: Weights,
  w_value: Array,
  u_TD: Array,
  chunk_size: int,
  inner_lr: float,
  max_step: float = 0.0,
  unroll: bool = False,
  remat_chunks: int = 0,
) -> tuple[Array, Weights]:
  """One sequence through a level updated every chunk_size tokens.

  Computes in u_TD's dtype; weights0 are carried (and returned) in float32.
  Returns the level's outputs (T, D) and the weights after the last whole
  chunk: those the sequence's next token would see. Each whole chunk costs one
  forward and one backward pass (`level_step`); a partial last chunk (any T)
  only its forward pass, as nothing uses its step. Per-chunk weights:
  `weights_per_chunk`.
  """
  length, dim = u_TD.shape
  whole = length // chunk_size * chunk_size
  weights = tuple(w.astype(jnp.float32) for w in weights0)
  u_NCD = u_TD[:whole].reshape(-1, chunk_size, dim)
  v_NCD = (u_NCD @ w_value.astype(u_TD.dtype)).astype(jnp.float32)
  weights, y_NCD = scan_chunks(weights, u_NCD, v_NCD, inner_lr, max_step, unroll, remat_chunks)
  y_TD = y_NCD.reshape(whole, dim)
  if whole < length:
    tail_y = swiglu(tuple(w.astype(u_TD.dtype) for w in weights), u_TD[whole:])
    y_TD = jnp.concatenate([y_TD, tail_y])
  return y_TD, weights


def weights_per_chunk(
  weights0: Weights,
  w_value: Array,
  u_TD: Array,
  chunk_size: int,
  inner_lr: float,
  max_step: float = 0.0,
) -> Weights:
  """The weights each chunk of `in_context_level` uses, stacked on a leading chunk axis (for
  tests and analyses; training never keeps them)."""
  chunks = -(-u_TD.shape[0] // chunk_size)
  u_TD = jnp.pad(u_TD, ((0, chunks * chunk_size - u_TD.shape[0]), (0, 0)))
  u_NCD = u_TD.reshape(chunks, chunk_size, -1)
  v_NCD = (u_NCD @ w_value.astype(u_TD.dtype)).astype(jnp.float32)
  step = lambda weights, u_v: (level_step(weights, *u_v, inner_lr, max_step)[1], weights)
  weights0 = tuple(w.astype(jnp.float32) for w in weights0)
  return jax.lax.scan(step, weights0, (u_NCD, v_NCD))[1]


def level_decode(
  weights: Weights,
  w_value: Array,
  buffer_CD: Array,
  n: Array,
  u_TD: Array,
  inner_lr: float,
  max_step: float,
) -> tuple[Array, Weights, Array]:
  """`in_context_level` continued by T tokens from a sequence whose current chunk holds n
  (traced, < C) tokens so far, buffered in buffer_CD's first n rows.

  The buffered and the new rows go into one array of K = ceil((C - 1 + T) / C) chunks
  (the new ones at the traced offset n); a scan over its chunks gives each its outputs
  and steps on the (n + T) // C whole ones (`level_step`, as in training; the steps
  after the last whole chunk are skipped by a cond). Returns the new tokens' outputs,
  the weights after the last whole chunk, and the next buffer: the rows of the
  unfinished chunk.
  """
  chunk_size, (length, dim) = buffer_CD.shape[0], u_TD.shape
  chunks = -(-(chunk_size - 1 + length) // chunk_size)
  rows_LD = jnp.zeros((chunks * chunk_size, dim), u_TD.dtype)
  rows_LD = jax.lax.dynamic_update_slice_in_dim(rows_LD, buffer_CD.astype(u_TD.dtype), 0, 0)
  rows_LD = jax.lax.dynamic_update_slice_in_dim(rows_LD, u_TD, n, 0)  # n + T <= L
  u_NCD = rows_LD.reshape(chunks, chunk_size, dim)
  v_NCD = (u_NCD @ w_value.astype(u_TD.dtype)).astype(jnp.float32)
  whole = (n + length) // chunk_size

  def chunk(weights, j_u_v):
    j, u_CD, v_CD = j_u_v
    step = lambda w: level_step(w, u_CD, v_CD, inner_lr, max_step)[::-1]
    forward = lambda w: (w, swiglu(tuple(a.astype(u_CD.dtype) for a in w), u_CD))
    return jax.lax.cond(j < whole, step, forward, weights)

  weights, y_NCD = jax.lax.scan(chunk, weights, (jnp.arange(chunks), u_NCD, v_NCD))
  y_TD = jax.lax.dynamic_slice_in_dim(y_NCD.reshape(-1, dim), n, length)
  # The unfinished chunk's rows; the slice start is clamped only when that chunk is empty.
  buffer_CD = jax.lax.dynamic_slice_in_dim(rows_LD, whole * chunk_size, chunk_size)
  return y_TD, weights, buffer_CD


class CMS(nnx.Module):
  """The chain of levels replacing the MLP of a Hope-attention block."""

  def __init__(self, spec: ModelSpec, width: int, *, rngs: nnx.Rngs):
    d, pdt, std = spec.d_model, jnp.dtype(spec.param_dtype), spec.init_std
    self.chunk_sizes = spec.hope.chunk_sizes
    self.inner_lrs = spec.hope.inner_lrs
    self.max_step, self.unroll = spec.hope.max_step, spec.hope.unroll
    self.remat_chunks = spec.hope.remat_chunks
    self.dtype = jnp.dtype(spec.dtype)
    self.levels = nnx.List()
    self.values = nnx.List()
    down_std = mlp_output_std(spec, width)
    for level, w in enumerate(level_widths(spec, width)):
      self.levels.append(
        nnx.List(
          [
            param(rngs, (d, w), ("embed", "mlp"), std, pdt),
            param(rngs, (d, w), ("embed", "mlp"), std, pdt),
            param(rngs, (w, d), ("mlp", "embed"), down_std, pdt),
          ]
        )
      )
      if self.chunk_sizes[level]:
        self.values.append(param(rngs, (d, d), ("embed", None), d**-0.5, pdt))

  def init_cache(self, batch: int, length: int) -> list[dict]:
    """Per in-context level: its current weights (float32, one copy per sequence), and its
    current chunk's inputs so far (`n` of them)."""
    del length
    caches = []
    for level, chunk in enumerate(self.chunk_sizes):
      if chunk:
        weights = tuple(
          jnp.broadcast_to(w[...].astype(jnp.float32), (batch, *w.shape))
          for w in self.levels[level]
        )
        u_BCD = jnp.zeros((batch, chunk, self.levels[level][0].shape[0]), self.dtype)
        caches.append(dict(weights=weights, u_BCD=u_BCD, n=jnp.zeros((), jnp.int32)))
    return caches

  def decode(self, x_BTD: Array, cache: list[dict]) -> tuple[Array, list[dict]]:
    """__call__ at the next T tokens of the sequence, level by level as in __call__: each
    in-context level takes the T tokens in whole chunks (`level_decode`), stepping on every
    chunk they finish, and buffers the rest of its unfinished chunk."""
    u_BTD = x_BTD.astype(self.dtype)
    out_BTD, new, caches = jnp.zeros_like(u_BTD), [], iter(zip(cache, self.values))
    for level, chunk in enumerate(self.chunk_sizes):
      if not chunk:
        y_BTD = swiglu(tuple(w[...].astype(self.dtype) for w in self.levels[level]), u_BTD)
      else:
        level_cache, w_value_DD = next(caches)
        n = level_cache["n"]
        run = lambda weights, buffer_CD, u_TD: level_decode(
          weights, w_value_DD[...], buffer_CD, n, u_TD, self.inner_lrs[level], self.max_step
        )
        y_BTD, weights, u_BCD = jax.vmap(run)(level_cache["weights"], level_cache["u_BCD"], u_BTD)
        n = (n + x_BTD.shape[1]) % chunk
        new.append(dict(weights=weights, u_BCD=u_BCD, n=n))
      u_BTD, out_BTD = u_BTD + y_BTD, out_BTD + y_BTD
    return out_BTD.astype(x_BTD.dtype), new

  def __call__(self, x_BTD: Array) -> Array:
    """The CMS's contribution: sum of the levels' residual updates."""
    u_BTD = x_BTD.astype(self.dtype)
    out_BTD = jnp.zeros_like(u_BTD)
    values = iter(self.values)
    for level, chunk in enumerate(self.chunk_sizes):
      if not chunk:
        y_BTD = swiglu(tuple(w[...].astype(self.dtype) for w in self.levels[level]), u_BTD)
        u_BTD, out_BTD = u_BTD + y_BTD, out_BTD + y_BTD
        continue
      weights = tuple(w[...] for w in self.levels[level])
      w_value_DD = next(values)[...]
      args = (chunk, self.inner_lrs[level], self.max_step, self.unroll, self.remat_chunks)
      run = lambda u_TD: in_context_level(weights, w_value_DD, u_TD, *args)[0]
      y_BTD = jax.vmap(run)(u_BTD)
      u_BTD, out_BTD = u_BTD + y_BTD, out_BTD + y_BTD
    return out_BTD.astype(x_BTD.dtype)
