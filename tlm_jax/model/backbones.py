"""One registry entry per backbone: its token mixer, its per-layer MLP, and their costs.

A block is x + mixer(norm(x)), then x + mlp(norm(x)); only the mixer and the
MLP (the part the taper sizes) differ between backbones. Adding a backbone is
one entry here, its cost functions in `costs.COSTS`, and its name in
`config.BACKBONES` (where its config fields are validated).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import jax
from flax import nnx

from tlm_jax.config import ModelSpec
from tlm_jax.model import costs
from tlm_jax.model.attention import Attention, GatedAttention
from tlm_jax.model.hope import CMS
from tlm_jax.model.layers import SwiGLU
from tlm_jax.model.titans import Titans


class Mixer(Protocol):
  """Mixes information across time; built once per layer."""

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs) -> None: ...

  def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array: ...


class MLP(Protocol):
  """The per-token part whose hidden width the taper sets per layer."""

  def __init__(self, spec: ModelSpec, width: int, *, rngs: nnx.Rngs) -> None: ...

  def __call__(self, x_BTD: jax.Array) -> jax.Array: ...


@dataclasses.dataclass(frozen=True)
class Backbone:
  mixer: type[Mixer]
  mlp: type[MLP]
  costs: costs.BackboneCosts


BACKBONES = {
  "transformer": Backbone(Attention, SwiGLU, costs.COSTS["transformer"]),
  "gated_attention": Backbone(GatedAttention, SwiGLU, costs.COSTS["gated_attention"]),
  "titans": Backbone(Titans, SwiGLU, costs.COSTS["titans"]),
  "hope_attention": Backbone(Attention, CMS, costs.COSTS["hope_attention"]),
}
