"""Hope-attention's Continuum Memory System (CMS, from "Nested Learning", Behrouz et al. 2025).

Hope-attention is softmax attention followed by a CMS in place of the MLP: a
chain of SwiGLU levels, u_{k+1} = u_k + MLP_k(u_k), where level k runs at its
own frequency. The paper leaves the in-context objective open; ours, per level
k with chunk size C_k > 0 (`model.hope.chunk_sizes`):

  - tokens are cut into chunks of C_k; every token of chunk j is processed
    with the weights W_k^(j);
  - after chunk j, one gradient step on the chunk's mean associative loss
        l(W) = mean_t 0.5 * || MLP_W(u_t) - u_t V_k ||^2
    gives W_k^(j+1) = W_k^(j) - inner_lr_k * grad l(W_k^(j)), where V_k is a
    learned d x d value map (the outer model decides what the level stores);
  - W_k^(0) are ordinary parameters, so the outer loss trains the starting
    point and V_k through the inner steps.
A level with chunk size 0 is never updated in context: ordinary weights, the
slowest level. Weights used in chunk j depend only on tokens of earlier
chunks, so the system is causal.

The taper sets the total width of the layer's CMS; `model.hope.width_fractions`
splits it over the levels exactly, each share a multiple of
`model.hope.level_tile`. So the taper's own tile must be coarse enough
(quarters of a layer need model.taper.tile = 4 x level_tile), and then every
level, in-context or not, holds and costs the same in tapered and uniform
models.
"""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax.errors import ConfigError
from tlm_jax.model.layers import output_std, param

Array = jax.Array


def level_widths(cfg: Any, width: int) -> list[int]:
  """Split a layer's CMS width over the levels exactly, in multiples of hope.level_tile."""
  tile = cfg.hope.level_tile
  shares = [Fraction(f).limit_denominator(1000) * width for f in cfg.hope.width_fractions]
  if any(s.denominator != 1 or s % tile or s <= 0 for s in shares):
    raise ConfigError(
        f"a CMS width of {width} does not split into model.hope.width_fractions="
        f"{tuple(cfg.hope.width_fractions)} in multiples of model.hope.level_tile={tile}: "
        "make model.taper.tile (and model.mlp_width) a multiple of level_tile / smallest fraction")
  return [int(s) for s in shares]


def swiglu(weights: tuple[Array, Array, Array], u: Array) -> Array:
  w_gate, w_up, w_down = weights
  return (jax.nn.silu(u @ w_gate) * (u @ w_up)) @ w_down


def associative_loss(weights: tuple[Array, Array, Array], u_CD: Array, w_value: Array) -> Array:
  return 0.5 * jnp.mean(jnp.sum((swiglu(weights, u_CD) - u_CD @ w_value) ** 2, axis=-1))


def in_context_level(weights0: tuple[Array, Array, Array], w_value: Array, u_TD: Array,
                     chunk_size: int, inner_lr: float) -> tuple[Array, tuple[Array, ...]]:
  """One sequence through a level updated every chunk_size tokens.

  Returns the level's outputs (T, D) and the weights used in each chunk
  (stacked on a leading chunk axis), so tests can see when they change.
  """
  chunks = u_TD.shape[0] // chunk_size

  def step(weights, u_CD):
    grads = jax.grad(associative_loss)(weights, u_CD, w_value)
    new = tuple(w - inner_lr * g for w, g in zip(weights, grads))
    return new, (swiglu(weights, u_CD), weights)

  _, (y, used) = jax.lax.scan(step, weights0, u_TD.reshape(chunks, chunk_size, -1))
  return y.reshape(u_TD.shape), used


class CMS(nnx.Module):
  """The chain of levels replacing the MLP of a Hope-attention block."""

  def __init__(self, cfg: Any, width: int, *, rngs: nnx.Rngs):
    d, pdt = cfg.d_model, jnp.dtype(cfg.param_dtype)
    self.chunk_sizes = tuple(cfg.hope.chunk_sizes)
    self.inner_lrs = tuple(cfg.hope.inner_lrs)
    self.levels = nnx.List()
    self.values = nnx.List()
    for level, w in enumerate(level_widths(cfg, width)):
      self.levels.append(nnx.List([
          param(rngs, (d, w), ("embed", "mlp"), cfg.init_std, pdt),
          param(rngs, (d, w), ("embed", "mlp"), cfg.init_std, pdt),
          param(rngs, (w, d), ("mlp", "embed"), output_std(cfg), pdt)]))
      if self.chunk_sizes[level]:
        self.values.append(param(rngs, (d, d), ("embed", None), d ** -0.5, pdt))

  def __call__(self, x_BTD: Array) -> Array:
    """The CMS's contribution: sum of the levels' residual updates."""
    u = x_BTD.astype(jnp.float32)
    values = iter(self.values)
    for level, chunk in enumerate(self.chunk_sizes):
      weights = tuple(w[...].astype(jnp.float32) for w in self.levels[level])
      if not chunk:
        u = u + swiglu(weights, u)
        continue
      if u.shape[1] % chunk:
        raise ConfigError(f"sequence length {u.shape[1]} is not a multiple of "
                          f"model.hope.chunk_sizes[{level}]={chunk}")
      w_value = next(values)[...].astype(jnp.float32)
      run = lambda u_TD: in_context_level(weights, w_value, u_TD, chunk, self.inner_lrs[level])[0]
      u = u + jax.vmap(run)(u)
    return (u - x_BTD.astype(jnp.float32)).astype(x_BTD.dtype)

  @staticmethod
  def param_count(cfg: Any, width: int) -> int:
    in_context = sum(1 for c in cfg.hope.chunk_sizes if c)
    return 3 * cfg.d_model * width + in_context * cfg.d_model ** 2

  @staticmethod
  def flops_per_token(cfg: Any, width: int) -> int:
    """Outer training FLOPs, plus each in-context level's inner forward and backward
    (about 3x its forward) and value map, counted 3x again for the outer pass."""
    d = cfg.d_model
    total = 6 * 3 * d * width
    for w, chunk in zip(level_widths(cfg, width), cfg.hope.chunk_sizes):
      if chunk:
        total += 6 * (3 * 3 * d * w + d * d)
    return total
