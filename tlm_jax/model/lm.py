"""The decoder: token embedding, one block per layer (each with its own MLP width), head.

`layers_mode` picks how layers are held and run:
- "unrolled": one block per layer (`blocks/0`, `blocks/1`, ...), run by a Python loop
  (fastest at run time on GPU, compile time grows with depth);
- "grouped": runs of consecutive layers of equal shape are held as one block whose params
  carry a leading layer axis (`stacks/0`, ...; a run of one layer is a plain block) and run
  by one `lax.scan` over them, so compile time grows with the number of distinct widths (a
  `stepped` taper gives K scans), not with depth, and no step restacks params.
Initial values do not depend on the mode; `stack_layers` / `unstack_layers` convert params
(or any tree holding them, such as Adam's moments) between the two layouts, which is how a
checkpoint of one mode resumes in the other (state.relayout).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax.errors import ConfigError
from tlm_jax.model import backbones
from tlm_jax.model.layers import RMSNorm, param
from tlm_jax.spec import LAYERS_MODES, ModelSpec

Array = jax.Array

# Named rematerialisation policies (config.REMATS): what a block keeps from the forward pass.
REMAT_POLICIES = {
  "none": None,  # keep everything (no remat)
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm(x)), then x + MLP_width(norm(x))."""

  def __init__(self, spec: ModelSpec, width: int, *, rngs: nnx.Rngs):
    pdt, (mixer, mlp) = jnp.dtype(spec.param_dtype), backbones.modules(spec.backbone)
    self.mixer_norm = RMSNorm(spec.d_model, spec.norm_eps, pdt)
    self.mixer = mixer(spec, rngs=rngs)
    self.mlp_norm = RMSNorm(spec.d_model, spec.norm_eps, pdt)
    self.mlp = mlp(spec, width, rngs=rngs)

  def __call__(self, x_BTD: Array, positions_BT: Array) -> Array:
    x_BTD = x_BTD + self.mixer(self.mixer_norm(x_BTD), positions_BT)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))

  def init_cache(self, batch: int, length: int) -> dict[str, Any]:
    """The mixer's cache, and the MLP's when it keeps state across tokens (Hope's CMS)."""
    cache = dict(mixer=self.mixer.init_cache(batch, length))
    if hasattr(self.mlp, "init_cache"):
      cache["mlp"] = self.mlp.init_cache(batch, length)
    return cache

  def decode(
    self, x_BTD: Array, positions_BT: Array, cache: dict[str, Any]
  ) -> tuple[Array, dict[str, Any]]:
    """__call__ for the next tokens of a sequence, given and returning the block's cache."""
    y_BTD, mixer_cache = self.mixer.decode(self.mixer_norm(x_BTD), positions_BT, cache["mixer"])
    x_BTD = x_BTD + y_BTD
    new = dict(mixer=mixer_cache)
    if "mlp" in cache:
      y_BTD, new["mlp"] = self.mlp.decode(self.mlp_norm(x_BTD), cache["mlp"])
    else:
      y_BTD = self.mlp(self.mlp_norm(x_BTD))
    return x_BTD + y_BTD, new


def layer_groups(widths: Sequence[Hashable], layers_mode: str) -> tuple[tuple[int, ...], ...]:
  """Layer indices per run: one run per layer when unrolled, runs of equal shape (residual
  and MLP width) when grouped."""
  if layers_mode == "unrolled":
    return tuple((l,) for l in range(len(widths)))
  groups: list[list[int]] = []
  for l, width in enumerate(widths):
    if groups and widths[groups[-1][0]] == width:
      groups[-1].append(l)
    else:
      groups.append([l])
  return tuple(tuple(g) for g in groups)


def read_width(stream_BTD: Array, width: int) -> Array:
  """A block's input at `width` (the ><former's parameter-free resize): narrowing keeps the
  first coordinates; widening restores the rest from the stream, which holds each
  coordinate's most recent value, and zeros where no earlier state had it."""
  have = stream_BTD.shape[-1]
  if width <= have:
    return stream_BTD[..., :width]
  return jnp.pad(stream_BTD, ((0, 0), (0, 0), (0, width - have)))


def write_width(stream_BTD: Array, x_BTD: Array) -> Array:
  """The stream after a block: its output in the first coordinates, older values beyond."""
  if x_BTD.shape[-1] >= stream_BTD.shape[-1]:
    return x_BTD
  return jnp.concatenate([x_BTD, stream_BTD[..., x_BTD.shape[-1] :]], axis=-1)


def run_blocks(block: Block, layers: int, x_BTD: Array, positions_BT: Array, remat: str) -> Array:
  """A block as a call, or a stack of `layers` blocks (stack_blocks) as one scan over its
  stored params."""
  graphdef, state = nnx.split(block)

  def apply(x, state):
    return nnx.merge(graphdef, state)(x, positions_BT)

  if remat != "none":
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])
  if layers == 1:
    return apply(x_BTD, state)
  return jax.lax.scan(lambda x, state: (apply(x, state), None), x_BTD, state)[0]


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _stack(variables: Sequence[nnx.Variable]) -> nnx.Variable:
  """Equal-shape variables of consecutive layers as one, with a leading "layers" axis (mapped
  to no mesh axis: each layer's own dims shard as before)."""
  axes = variables[0].get_metadata()["logical_axes"]
  value = jnp.stack([v[...] for v in variables])
  return variables[0].replace(value, logical_axes=("layers", *axes))


def _take(variable: nnx.Variable, layer: int) -> nnx.Variable:
  """One layer of a stacked variable (_stack undone)."""
  axes = variable.get_metadata()["logical_axes"][1:]
  return variable.replace(variable[...][layer], logical_axes=axes)


def stack_blocks(blocks: Sequence[Block]) -> Block:
  """Equal-shape blocks as one whose params carry a leading layer axis; one block as is."""
  if len(blocks) == 1:
    return blocks[0]
  states = [nnx.state(b) for b in blocks]
  stacked = jax.tree.map(lambda *vs: _stack(vs), *states, is_leaf=_is_variable)
  return nnx.merge(nnx.graphdef(blocks[0]), stacked)


def unstack_block(block: Block, layers: int) -> list[Block]:
  """The `layers` per-layer blocks of a stack_blocks result."""
  if layers == 1:
    return [block]
  graphdef, state = nnx.split(block)
  return [
    nnx.merge(graphdef, jax.tree.map(lambda v, l=l: _take(v, l), state, is_leaf=_is_variable))
    for l in range(layers)
  ]


def _is_decoder_state(x: Any) -> bool:
  return isinstance(x, nnx.State) and ("blocks" in x or "stacks" in x)


def stack_layers(tree: Any, groups: Sequence[Sequence[int]]) -> Any:
  """`tree` (a Decoder's state, or a tree holding such states: a train state with Adam's
  moments) with each per-layer decoder state (`blocks`) in the grouped layout (`stacks`, one
  entry per group of `layer_groups(..., "grouped")`)."""

  def convert(state):
    flat, layers = _split_layers(state, "blocks")
    for k, group in enumerate(groups):
      for rest in layers[group[0]]:
        variables = [layers[l][rest] for l in group]
        flat[("stacks", k, *rest)] = variables[0] if len(group) == 1 else _stack(variables)
    return nnx.from_flat_state(flat)

  return _map_decoder_states(convert, tree)


def unstack_layers(tree: Any, groups: Sequence[Sequence[int]]) -> Any:
  """stack_layers undone: each grouped decoder state in `tree` back to one entry per layer."""

  def convert(state):
    flat, stacks = _split_layers(state, "stacks")
    for k, group in enumerate(groups):
      for rest, variable in stacks[k].items():
        for i, l in enumerate(group):
          flat[("blocks", l, *rest)] = variable if len(group) == 1 else _take(variable, i)
    return nnx.from_flat_state(flat)

  return _map_decoder_states(convert, tree)


def _map_decoder_states(convert: Callable[[nnx.State], nnx.State], tree: Any) -> Any:
  """`tree` with `convert` applied to each decoder state in it; other leaves (steps, Adam's
  count) as they are."""

  def one(x):
    return convert(x) if _is_decoder_state(x) else x

  return jax.tree.map(one, tree, is_leaf=_is_decoder_state)


def _split_layers(state: nnx.State, key: str) -> tuple[dict, dict[int, dict]]:
  """A decoder state's variables outside `key` by path, and those under it by index, then
  path within the entry."""
  if key not in state:
    other = "stacks" if key == "blocks" else "blocks"
    raise ValueError(f"expected a decoder state holding {key!r}, got one holding {other!r}")
  flat, entries = {}, {}
  for path, variable in nnx.to_flat_state(state):
    if path[0] == key:
      entries.setdefault(path[1], {})[path[2:]] = variable
    else:
      flat[path] = variable
  return flat, entries


class Decoder(nnx.Module):
  """A decoder LM whose layer l has MLP width widths[l]."""

  def __init__(
    self,
    spec: ModelSpec,
    widths: Sequence[int],
    *,
    rngs: nnx.Rngs,
    residual_widths: Sequence[int] | None = None,
  ):
    """`residual_widths`: each block's residual width (default d_model everywhere); the
    embedding runs at the first block's width, the final norm and head at the last's."""
    residual = tuple(residual_widths or [spec.d_model] * spec.num_layers)
    if not len(widths) == len(residual) == spec.num_layers:
      raise ConfigError(
        f"got {len(widths)} MLP and {len(residual)} residual widths for "
        f"model.num_layers={spec.num_layers}"
      )
    if spec.tie_embeddings and residual[0] != residual[-1]:
      raise ConfigError(
        "model.tie_embeddings needs the first and last residual widths equal; got "
        f"{residual[0]} and {residual[-1]}"
      )
    first, last, v = residual[0], residual[-1], spec.vocab_size
    pdt = jnp.dtype(spec.param_dtype)
    self.embed = param(rngs, (v, first), ("vocab", "embed"), spec.init_std, pdt)
    blocks = [Block(spec.at_width(d), w, rngs=rngs) for d, w in zip(residual, widths)]
    self.groups = layer_groups(list(zip(residual, widths)), spec.layers_mode)
    if spec.layers_mode == "grouped":
      self.stacks = nnx.List([stack_blocks([blocks[l] for l in g]) for g in self.groups])
    else:
      self.blocks = nnx.List(blocks)
    self.final_norm = RMSNorm(last, spec.norm_eps, pdt)
    self.head = (
      None
      if spec.tie_embeddings
      else param(rngs, (last, v), ("embed", "vocab"), spec.init_std, pdt)
    )
    self.dtype = jnp.dtype(spec.dtype)
    self.remat = spec.remat
    self.widths = tuple(widths)
    self.residual_widths = residual
    self.spec = spec

  def __getattr__(self, name: str) -> Any:
    """Only for attributes not found: tools that read `blocks` get the fix, not a bare
    AttributeError, from a grouped decoder."""
    if name == "blocks" and "stacks" in vars(self):
      raise ConfigError(
        "this decoder holds its layers stacked per group (model.layers_mode='grouped'), not "
        "as per-layer `blocks`; lm.set_layers_mode(model, 'unrolled') converts it in place "
        "(restore.latest always gives per-layer blocks)"
      )
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None) -> Array:
    """Float32 next-token logits (B, T, V)."""
    return self.unembed(self.trunk(self.embed_tokens(tokens_BT), positions_BT))

  def embed_tokens(self, tokens_BT: Array) -> Array:
    return jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.dtype)

  def trunk(self, x_BTD: Array, positions_BT: Array | None = None) -> Array:
    """All blocks and the final norm, from embeddings to the head's input."""
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
    stream_BTD = x_BTD
    runs = self.stacks if "stacks" in vars(self) else self.blocks
    for group, block in zip(self.groups, runs):
      x_BTD = read_width(stream_BTD, self.residual_widths[group[0]])
      x_BTD = run_blocks(block, len(group), x_BTD, positions_BT, self.remat)
      stream_BTD = write_width(stream_BTD, x_BTD)
    return self.final_norm(read_width(stream_BTD, self.residual_widths[-1]))

  def init_cache(self, batch: int, length: int) -> list[dict[str, Any]]:
    """Per-layer decoding caches for `batch` sequences of up to `length` tokens."""
    return [block.init_cache(batch, length) for block in self.blocks]

  def decode(
    self, tokens_BT: Array, positions_BT: Array, cache: list[dict[str, Any]]
  ) -> tuple[Array, list[dict[str, Any]]]:
    """Logits of the next T tokens of sequences whose earlier tokens are in `cache` (prefill,
    then one token a step): equal to __call__ on the whole sequences at these positions."""
    h_BTD, cache = self.decode_trunk(tokens_BT, positions_BT, cache)
    return self.unembed(h_BTD), cache

  def decode_trunk(
    self, tokens_BT: Array, positions_BT: Array, cache: list[dict[str, Any]]
  ) -> tuple[Array, list[dict[str, Any]]]:
    """decode up to the head's input (a prefill unembeds its last token only). Blocks run
    one by one (each layer has its own cache): the per-layer layout only."""
    stream_BTD, new = self.embed_tokens(tokens_BT), []
    for block, width, block_cache in zip(self.blocks, self.residual_widths, cache):
      x_BTD, block_cache = block.decode(read_width(stream_BTD, width), positions_BT, block_cache)
      stream_BTD = write_width(stream_BTD, x_BTD)
      new.append(block_cache)
    return self.final_norm(read_width(stream_BTD, self.residual_widths[-1])), new

  def unembed(self, h_BTD: Array) -> Array:
    w_DV = self.embed[...].T if self.head is None else self.head[...]
    return jnp.einsum(
      "btd,dv->btv", h_BTD, w_DV.astype(self.dtype), preferred_element_type=jnp.float32
    )


def set_layers_mode(model: Decoder, layers_mode: str) -> None:
  """Switch unrolled <-> grouped in place: the layers' params are stacked or unstacked (new
  arrays, same values)."""
  if layers_mode not in LAYERS_MODES:
    raise ConfigError(f"model.layers_mode={layers_mode!r} is unknown; use one of {LAYERS_MODES}")
  shapes = list(zip(model.residual_widths, model.widths))
  grouped = layer_groups(shapes, "grouped")
  if layers_mode == "grouped" and "blocks" in vars(model):
    model.stacks = nnx.List([stack_blocks([model.blocks[l] for l in g]) for g in grouped])
    del model.blocks
  elif layers_mode == "unrolled" and "stacks" in vars(model):
    model.blocks = nnx.List(
      [b for stack, g in zip(model.stacks, grouped) for b in unstack_block(stack, len(g))]
    )
    del model.stacks
  model.groups = layer_groups(shapes, layers_mode)


def param_count(model: nnx.Module) -> int:
  """Parameters actually held by a built model."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
