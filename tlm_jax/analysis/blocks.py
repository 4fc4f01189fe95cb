"""Run a decoder's blocks one sublayer at a time, in any order: the instrument every analysis uses.

A block is x + mixer(mixer_norm(x)), then x + mlp(mlp_norm(x)) (model/lm.py's
`Block`); here the two sublayers are separate steps, so an analysis can read
each update and the residual stream it is added to, or run a *plan*: at each
position of the stack, the mixer of one slot and the MLP of another (or none).

    plan position p: x += mixer_{m[p]}(...); x += mlp_{f[p]}(...)   (index L: skip)

The plan indices are traced values chosen by `lax.switch` inside one `lax.scan`,
so every swap, copy, removal or loop of the same length reuses one compiled
program, and compile size grows with depth, not with the number of plans.
Tapered slots hold MLPs of different widths; a branch always runs a whole
sublayer with its own weights, so widths never have to match.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax.model import lm

Array = jax.Array


def positions_like(tokens_BT: Array) -> Array:
  return jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)


def mixer_update(block: lm.Block, x_BTD: Array, positions_BT: Array) -> Array:
  """What a block's mixer adds to the stream x."""
  return block.mixer(block.mixer_norm(x_BTD), positions_BT)


def mlp_update(block: lm.Block, x_BTD: Array) -> Array:
  """What a block's MLP adds to the stream x (the stream after the mixer's update)."""
  return block.mlp(block.mlp_norm(x_BTD))


def run_block(block: lm.Block, x_BTD: Array, positions_BT: Array) -> Array:
  """The same arithmetic as `Block.__call__`, written as its two steps."""
  x_BTD = x_BTD + mixer_update(block, x_BTD, positions_BT)
  return x_BTD + mlp_update(block, x_BTD)


def head(model: lm.Decoder, x_BTD: Array) -> Array:
  """Final norm and unembedding: float32 logits (B, T, V)."""
  return model.unembed(model.final_norm(x_BTD))


def switch_mixer(model: lm.Decoder, index: Array, x_BTD: Array, positions_BT: Array) -> Array:
  """x + mixer_index(x); index == L adds nothing."""
  branches = [lambda x, b=b: mixer_update(b, x, positions_BT) for b in model.blocks]
  return x_BTD + jax.lax.switch(index, [*branches, jnp.zeros_like], x_BTD)


def switch_mlp(model: lm.Decoder, index: Array, x_BTD: Array) -> Array:
  """x + mlp_index(x); index == L adds nothing."""
  branches = [lambda x, b=b: mlp_update(b, x) for b in model.blocks]
  return x_BTD + jax.lax.switch(index, [*branches, jnp.zeros_like], x_BTD)


def switch_block(model: lm.Decoder, index: Array, x_BTD: Array, positions_BT: Array) -> Array:
  """Block `index` (whole, its own MLP width); index == L is the identity."""
  return switch_mlp(model, index, switch_mixer(model, index, x_BTD, positions_BT))


def run_plan(
  model: lm.Decoder, x_BTD: Array, positions_BT: Array, mixers_P: Array, mlps_P: Array
) -> Array:
  """Position p adds slot mixers_P[p]'s mixer, then slot mlps_P[p]'s MLP (L: skip)."""

  def step(x, indices):
    m, f = indices
    return switch_mlp(model, f, switch_mixer(model, m, x, positions_BT)), None

  return jax.lax.scan(step, x_BTD, (mixers_P, mlps_P))[0]


def plan_logits(model: lm.Decoder, tokens_BT: Array, mixers_P: Array, mlps_P: Array) -> Array:
  positions_BT = positions_like(tokens_BT)
  return head(model, run_plan(model, model.embed_tokens(tokens_BT), positions_BT, mixers_P, mlps_P))


def token_nll(logits_BTV: Array, targets_BT: Array) -> Array:
  """Next-token negative log-likelihood per position (nats)."""
  logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply(fn: Callable, graphdef: nnx.GraphDef, params: nnx.State, *args: Any) -> Any:
  return fn(nnx.merge(graphdef, params), *args)


def jit_method(model: lm.Decoder, fn: Callable) -> Callable:
  """jit(fn(model, *args)) with the model's params as an argument (not baked in as constants):
  models of one graph (a base model and its fine-tuned copy) share the compiled program."""
  graphdef, params = nnx.split(model)
  return functools.partial(_apply, fn, graphdef, params)
