"""What a backbone's parts must provide, and the classes its registry entry names.

The list of backbones and everything else about them is model/registry.py
(pure, importable without JAX); this module turns an entry's 'module:Class'
names into the classes the decoder builds. Every backbone decodes with a cache
(generate.py): a new mixer implements `CachedMixer`, and an MLP with state
across tokens `CachedMLP`.
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol

import jax
from flax import nnx

from tlm_jax.model import registry
from tlm_jax.spec import ModelSpec


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


def _resolve(name: str) -> type:
  module, _, attr = name.partition(":")
  return getattr(importlib.import_module(module), attr)


def modules(backbone: str) -> tuple[type[CachedMixer], type[MLP]]:
  """(mixer class, MLP class) of a registered backbone."""
  entry = registry.get(backbone)
  return _resolve(entry.mixer), _resolve(entry.mlp)
