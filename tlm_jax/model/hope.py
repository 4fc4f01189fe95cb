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

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax.config import ModelSpec
from tlm_jax.errors import ConfigError
from tlm_jax.model.costs import level_widths
from tlm_jax.model.layers import output_std, param

Array = jax.Array


def swiglu(weights: tuple[Array, Array, Array], u_TD: Array) -> Array:
  w_gate_DF, w_up_DF, w_down_FD = weights
  return (jax.nn.silu(u_TD @ w_gate_DF) * (u_TD @ w_up_DF)) @ w_down_FD


def associative_loss(weights: tuple[Array, Array, Array], u_CD: Array, w_value: Array) -> Array:
  return 0.5 * jnp.mean(jnp.sum((swiglu(weights, u_CD) - u_CD @ w_value) ** 2, axis=-1))


def in_context_level(
  weights0: tuple[Array, Array, Array],
  w_value: Array,
  u_TD: Array,
  chunk_size: int,
  inner_lr: float,
) -> tuple[Array, tuple[Array, ...]]:
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

  def __init__(self, spec: ModelSpec, width: int, *, rngs: nnx.Rngs):
    d, pdt, std = spec.d_model, jnp.dtype(spec.param_dtype), spec.init_std
    self.chunk_sizes = spec.hope.chunk_sizes
    self.inner_lrs = spec.hope.inner_lrs
    self.levels = nnx.List()
    self.values = nnx.List()
    for level, w in enumerate(level_widths(spec, width)):
      self.levels.append(
        nnx.List(
          [
            param(rngs, (d, w), ("embed", "mlp"), std, pdt),
            param(rngs, (d, w), ("embed", "mlp"), std, pdt),
            param(rngs, (w, d), ("mlp", "embed"), output_std(spec), pdt),
          ]
        )
      )
      if self.chunk_sizes[level]:
        self.values.append(param(rngs, (d, d), ("embed", None), d**-0.5, pdt))

  def __call__(self, x_BTD: Array) -> Array:
    """The CMS's contribution: sum of the levels' residual updates."""
    u_BTD = x_BTD.astype(jnp.float32)
    values = iter(self.values)
    for level, chunk in enumerate(self.chunk_sizes):
      weights = tuple(w[...].astype(jnp.float32) for w in self.levels[level])
      if not chunk:
        u_BTD = u_BTD + swiglu(weights, u_BTD)
        continue
      if u_BTD.shape[1] % chunk:
        raise ConfigError(
          f"sequence length {u_BTD.shape[1]} is not a multiple of "
          f"model.hope.chunk_sizes[{level}]={chunk}"
        )
      w_value_DD = next(values)[...].astype(jnp.float32)
      lr = self.inner_lrs[level]
      run = lambda u_TD: in_context_level(weights, w_value_DD, u_TD, chunk, lr)[0]
      u_BTD = u_BTD + jax.vmap(run)(u_BTD)
    return (u_BTD - x_BTD.astype(jnp.float32)).astype(x_BTD.dtype)
