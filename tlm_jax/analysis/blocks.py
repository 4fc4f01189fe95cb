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

Residual widths (the X-shaped model, tlm_jax/xshape.py): every sublayer runs at
the residual width of the layer it belongs to, and moves with it in a plan. It
reads the stream at that width and writes its sum back (lm.read_width /
lm.write_width), as the decoder does around a block; a block's two sublayers
share a width, so splitting a block changes nothing. The runner carries the
stream at the model's widest residual width, with zeros where no block has
written yet (what read_width widens with), so every branch and scan step has
one shape; the embedding and the head stay in place (the head reads the stream
at the last layer's width). In a uniform model all of this is the identity.
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
  """What a block's mixer adds to the stream x (read at the block's residual width)."""
  return block.mixer(block.mixer_norm(x_BTD), positions_BT)


def mlp_update(block: lm.Block, x_BTD: Array) -> Array:
  """What a block's MLP adds to the stream x (the stream after the mixer's update)."""
  return block.mlp(block.mlp_norm(x_BTD))


def run_block(block: lm.Block, x_BTD: Array, positions_BT: Array) -> Array:
  """The same arithmetic as `Block.__call__`, written as its two steps."""
  x_BTD = x_BTD + mixer_update(block, x_BTD, positions_BT)
  return x_BTD + mlp_update(block, x_BTD)


def add_update(stream_BTD: Array, width: int, update: Callable[[Array], Array]) -> Array:
  """The stream with x + update(x) written back, x being the stream read at `width`."""
  x_BTD = lm.read_width(stream_BTD, width)
  return lm.write_width(stream_BTD, x_BTD + update(x_BTD))


def embed(model: lm.Decoder, tokens_BT: Array) -> Array:
  """The token embeddings as the runner's stream: at the widest residual width."""
  return lm.read_width(model.embed_tokens(tokens_BT), max(model.residual_widths))


def head(model: lm.Decoder, stream_BTD: Array) -> Array:
  """Final norm and unembedding of the stream read at the last layer's width: float32
  logits (B, T, V)."""
  return model.unembed(model.final_norm(lm.read_width(stream_BTD, model.residual_widths[-1])))


def switch_mixer(model: lm.Decoder, index: Array, stream_BTD: Array, positions_BT: Array) -> Array:
  """The stream plus mixer_index's update, at layer index's residual width; index == L adds
  nothing."""

  def branch(block, width):
    return lambda s: add_update(s, width, lambda x: mixer_update(block, x, positions_BT))

  branches = [branch(b, d) for b, d in zip(model.blocks, model.residual_widths)]
  return jax.lax.switch(index, [*branches, lambda s: s], stream_BTD)


def switch_mlp(model: lm.Decoder, index: Array, stream_BTD: Array) -> Array:
  """The stream plus mlp_index's update, at layer index's residual width; index == L adds
  nothing."""

  def branch(block, width):
    return lambda s: add_update(s, width, lambda x: mlp_update(block, x))

  branches = [branch(b, d) for b, d in zip(model.blocks, model.residual_widths)]
  return jax.lax.switch(index, [*branches, lambda s: s], stream_BTD)


def switch_block(model: lm.Decoder, index: Array, stream_BTD: Array, positions_BT: Array) -> Array:
  """Block `index` (whole, its own MLP and residual width); index == L is the identity."""
  return switch_mlp(model, index, switch_mixer(model, index, stream_BTD, positions_BT))


def run_plan(
  model: lm.Decoder, stream_BTD: Array, positions_BT: Array, mixers_P: Array, mlps_P: Array
) -> Array:
  """Position p adds slot mixers_P[p]'s mixer, then slot mlps_P[p]'s MLP (L: skip)."""

  def step(stream, indices):
    m, f = indices
    return switch_mlp(model, f, switch_mixer(model, m, stream, positions_BT)), None

  return jax.lax.scan(step, stream_BTD, (mixers_P, mlps_P))[0]


def plan_logits(model: lm.Decoder, tokens_BT: Array, mixers_P: Array, mlps_P: Array) -> Array:
  positions_BT = positions_like(tokens_BT)
  return head(model, run_plan(model, embed(model, tokens_BT), positions_BT, mixers_P, mlps_P))


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
