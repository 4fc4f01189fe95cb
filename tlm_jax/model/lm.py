"""The decoder: token embedding, one block per layer (each with its own MLP width), head.

Layers are always stored one per slot (`blocks/0`, `blocks/1`, ...), whatever
`layers_mode` says, so a checkpoint loads in either mode unchanged:
- "unrolled": a Python loop over the blocks (fastest at run time on GPU,
  compile time grows with depth);
- "grouped": runs of consecutive blocks of equal shape are stacked at trace
  time and run by one `lax.scan`, so compile time grows with the number of
  distinct widths (a `stepped` taper gives K scans), not with depth.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax.config import LAYERS_MODES, ModelSpec
from tlm_jax.errors import ConfigError
from tlm_jax.model.backbones import BACKBONES
from tlm_jax.model.layers import RMSNorm, param

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
    pdt, backbone = jnp.dtype(spec.param_dtype), BACKBONES[spec.backbone]
    self.mixer_norm = RMSNorm(spec.d_model, spec.norm_eps, pdt)
    self.mixer = backbone.mixer(spec, rngs=rngs)
    self.mlp_norm = RMSNorm(spec.d_model, spec.norm_eps, pdt)
    self.mlp = backbone.mlp(spec, width, rngs=rngs)

  def __call__(self, x_BTD: Array, positions_BT: Array) -> Array:
    x_BTD = x_BTD + self.mixer(self.mixer_norm(x_BTD), positions_BT)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))


def layer_groups(widths: Sequence[int], layers_mode: str) -> tuple[tuple[int, ...], ...]:
  """Layer indices per run: one run per layer when unrolled, equal-width runs when grouped."""
  if layers_mode == "unrolled":
    return tuple((l,) for l in range(len(widths)))
  groups: list[list[int]] = []
  for l, width in enumerate(widths):
    if groups and widths[groups[-1][0]] == width:
      groups[-1].append(l)
    else:
      groups.append([l])
  return tuple(tuple(g) for g in groups)


def run_blocks(blocks: list[Block], x_BTD: Array, positions_BT: Array, remat: str) -> Array:
  """One block as a call, or equal-shape blocks as one scan over params stacked on the fly."""
  graphdef, _ = nnx.split(blocks[0])

  def apply(x, state):
    return nnx.merge(graphdef, state)(x, positions_BT)

  if remat != "none":
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])
  if len(blocks) == 1:
    return apply(x_BTD, nnx.state(blocks[0]))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
  return jax.lax.scan(lambda x, state: (apply(x, state), None), x_BTD, stacked)[0]


class Decoder(nnx.Module):
  """A decoder LM whose layer l has MLP width widths[l]."""

  def __init__(self, spec: ModelSpec, widths: Sequence[int], *, rngs: nnx.Rngs):
    if len(widths) != spec.num_layers:
      raise ConfigError(f"got {len(widths)} widths for model.num_layers={spec.num_layers}")
    d, v, pdt = spec.d_model, spec.vocab_size, jnp.dtype(spec.param_dtype)
    self.embed = param(rngs, (v, d), ("vocab", "embed"), spec.init_std, pdt)
    self.blocks = nnx.List([Block(spec, w, rngs=rngs) for w in widths])
    self.final_norm = RMSNorm(d, spec.norm_eps, pdt)
    self.head = (
      None if spec.tie_embeddings else param(rngs, (d, v), ("embed", "vocab"), spec.init_std, pdt)
    )
    self.dtype = jnp.dtype(spec.dtype)
    self.remat = spec.remat
    self.widths = tuple(widths)
    self.groups = layer_groups(widths, spec.layers_mode)

  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None) -> Array:
    """Float32 next-token logits (B, T, V)."""
    return self.unembed(self.trunk(self.embed_tokens(tokens_BT), positions_BT))

  def embed_tokens(self, tokens_BT: Array) -> Array:
    return jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.dtype)

  def trunk(self, x_BTD: Array, positions_BT: Array | None = None) -> Array:
    """All blocks and the final norm, from embeddings to the head's input."""
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
    for group in self.groups:
      x_BTD = run_blocks([self.blocks[l] for l in group], x_BTD, positions_BT, self.remat)
    return self.final_norm(x_BTD)

  def unembed(self, h_BTD: Array) -> Array:
    w_DV = self.embed[...].T if self.head is None else self.head[...]
    return jnp.einsum(
      "btd,dv->btv", h_BTD, w_DV.astype(self.dtype), preferred_element_type=jnp.float32
    )


def set_layers_mode(model: Decoder, layers_mode: str) -> None:
  """Switch unrolled <-> grouped in place; the params are shared, nothing moves."""
  if layers_mode not in LAYERS_MODES:
    raise ConfigError(f"model.layers_mode={layers_mode!r} is unknown; use one of {LAYERS_MODES}")
  model.groups = layer_groups(model.widths, layers_mode)


def param_count(model: nnx.Module) -> int:
  """Parameters actually held by a built model."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
