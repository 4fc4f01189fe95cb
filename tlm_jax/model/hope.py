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


def in_context_level(
  weights0: Weights,
  w_value: Array,
  u_TD: Array,
  chunk_size: int,
  inner_lr: float,
  max_step: float = 0.0,
  unroll: bool = False,
) -> tuple[Array, Weights]:
  """One sequence through a level updated every chunk_size tokens.

  Computes in u_TD's dtype; weights0 are carried (and returned) in float32.
  Returns the level's outputs (T, D) and the weights used in each chunk
  (stacked on a leading chunk axis), so tests can see when they change. Each
  chunk costs one forward and one backward pass (`level_step`). Any T: the last
  chunk is padded with zeros, which only the weights after it (unused) see.
  """
  length = u_TD.shape[0]
  chunks = -(-length // chunk_size)
  u_TD = jnp.pad(u_TD, ((0, chunks * chunk_size - length), (0, 0)))
  weights0 = tuple(w.astype(jnp.float32) for w in weights0)
  v_TD = (u_TD @ w_value.astype(u_TD.dtype)).astype(jnp.float32)

  def step(weights, chunk):
    y_CD, new = level_step(weights, *chunk, inner_lr, max_step)
    return new, (y_CD, weights)

  split = lambda a_TD: a_TD.reshape(chunks, chunk_size, -1)
  _, (y, used) = jax.lax.scan(step, weights0, (split(u_TD), split(v_TD)), unroll=unroll)
  return y.reshape(u_TD.shape)[:length], used


class CMS(nnx.Module):
  """The chain of levels replacing the MLP of a Hope-attention block."""

  def __init__(self, spec: ModelSpec, width: int, *, rngs: nnx.Rngs):
    d, pdt, std = spec.d_model, jnp.dtype(spec.param_dtype), spec.init_std
    self.chunk_sizes = spec.hope.chunk_sizes
    self.inner_lrs = spec.hope.inner_lrs
    self.max_step, self.unroll = spec.hope.max_step, spec.hope.unroll
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
    """__call__ at the next T tokens of the sequence, a token at a time: a token's output
    uses its level's current weights; the token that fills a chunk then takes the inner
    step on it (`level_step`, as in training)."""
    values = [v[...] for v in self.values]

    def token(cache, x_BD):
      u_BD = x_BD.astype(self.dtype)
      out_BD, new, caches = jnp.zeros_like(u_BD), [], iter(zip(cache, values))
      for level, chunk in enumerate(self.chunk_sizes):
        if not chunk:
          y_BD = swiglu(tuple(w[...].astype(self.dtype) for w in self.levels[level]), u_BD)
        else:
          level_cache, w_value_DD = next(caches)
          y_BD, level_cache = self.level_token(level, u_BD, w_value_DD, level_cache)
          new.append(level_cache)
        u_BD, out_BD = u_BD + y_BD, out_BD + y_BD
      return new, out_BD.astype(x_BD.dtype)

    cache, out_TBD = jax.lax.scan(token, cache, jnp.moveaxis(x_BTD, 1, 0))
    return jnp.moveaxis(out_TBD, 0, 1), cache

  def level_token(
    self, level: int, u_BD: Array, w_value_DD: Array, cache: dict
  ) -> tuple[Array, dict]:
    """One token through an in-context level: output and cache."""
    weights, n, chunk = cache["weights"], cache["n"], self.chunk_sizes[level]
    y_BD = jax.vmap(swiglu)(tuple(w.astype(self.dtype) for w in weights), u_BD)
    u_BCD = jax.lax.dynamic_update_slice_in_dim(cache["u_BCD"], u_BD[:, None], n, axis=1)

    def update(weights):
      v_BCD = (u_BCD @ w_value_DD.astype(self.dtype)).astype(jnp.float32)
      step = lambda w, u_CD, v_CD: level_step(w, u_CD, v_CD, self.inner_lrs[level], self.max_step)
      return jax.vmap(step)(weights, u_BCD, v_BCD)[1]

    weights = jax.lax.cond(n + 1 == chunk, update, lambda w: w, weights)
    return y_BD, dict(weights=weights, u_BCD=u_BCD, n=(n + 1) % chunk)

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
      args = (chunk, self.inner_lrs[level], self.max_step, self.unroll)
      run = lambda u_TD: in_context_level(weights, w_value_DD, u_TD, *args)[0]
      y_BTD = jax.vmap(run)(u_BTD)
      u_BTD, out_BTD = u_BTD + y_BTD, out_BTD + y_BTD
    return out_BTD.astype(x_BTD.dtype)
