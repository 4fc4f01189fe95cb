"""One registry entry per backbone: its token mixer, its per-layer MLP, and their costs.

A block is x + mixer(norm(x)), then x + mlp(norm(x)); only the mixer and the
MLP (the part the taper sizes) differ between backbones. Adding a backbone is
one entry here, its cost functions in `costs.COSTS`, and its name in
`config.BACKBONES` (where its config fields are validated). Every backbone
decodes with a cache (generate.py): a new mixer implements `CachedMixer`, and
an MLP with state across tokens `CachedMLP`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol

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


class CachedMixer(Mixer, Protocol):
  """A mixer that decodes a sequence piece by piece (generate.py: prefill, then a token a step).

  The cache is a pytree of arrays sized once for the whole sequence (its shapes
  never change, so a jitted decode loop carries it). decode(x, positions,
  cache) continues the sequence by T >= 1 tokens and must equal __call__ on the
  whole sequence at those positions (tests/test_generate.py checks it token for
  token): attention keeps keys and values; a recurrent memory keeps its state
  and the tokens of its unfinished chunk, and updates at the same chunk
  boundaries as in training.
  """

  def init_cache(self, batch: int, length: int) -> Any: ...

  def decode(
    self, x_BTD: jax.Array, positions_BT: jax.Array, cache: Any
  ) -> tuple[jax.Array, Any]: ...


class CachedMLP(MLP, Protocol):
  """An MLP that keeps state across tokens (Hope's CMS levels) decodes like a CachedMixer;
  a per-token MLP (SwiGLU) defines neither method and is simply called."""

  def init_cache(self, batch: int, length: int) -> Any: ...

  def decode(self, x_BTD: jax.Array, cache: Any) -> tuple[jax.Array, Any]: ...


@dataclasses.dataclass(frozen=True)
class Backbone:
  """Every mixer decodes with a cache (CachedMixer); so does an MLP that keeps state."""

  mixer: type[CachedMixer]
  mlp: type[MLP]
  costs: costs.BackboneCosts


BACKBONES = {
  "transformer": Backbone(Attention, SwiGLU, costs.COSTS["transformer"]),
  "gated_attention": Backbone(GatedAttention, SwiGLU, costs.COSTS["gated_attention"]),
  "titans": Backbone(Titans, SwiGLU, costs.COSTS["titans"]),
  "hope_attention": Backbone(Attention, CMS, costs.COSTS["hope_attention"]),
}
