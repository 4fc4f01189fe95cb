"""Parameter and FLOP counts per layer, from the model spec alone (pure Python, no JAX).

Tapered layers differ, so totals are per-layer sums. FLOPs are training FLOPs
(forward + backward = 3x forward) per token, the convention MFU uses. Each
backbone's mixer and MLP costs are one `BackboneCosts` entry; the modules in
this package hold exactly the parameters counted here (tests build them and
compare).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction

from tlm_jax.config import ModelSpec
from tlm_jax.errors import ConfigError

# ---------------------------------------------------------------------------
# Attention (Transformer, Gated Attention, Hope-attention, and inside Titans).
# ---------------------------------------------------------------------------


def attention_projection_params(spec: ModelSpec) -> int:
  return 2 * spec.d_model * spec.head_dim * (spec.num_heads + spec.num_kv_heads)


def attention_params(spec: ModelSpec) -> int:
  persistent = 2 * spec.persistent_tokens * spec.num_kv_heads * spec.head_dim
  return attention_projection_params(spec) + persistent


def attention_core_flops(spec: ModelSpec, keys_seen: int) -> int:
  """Projections at 6 per weight; scores and weighted values, 2 matmuls of keys seen x
  head_dim per head, counted without the causal half (the PaLM/MaxText MFU convention)."""
  return 6 * attention_projection_params(spec) + 12 * keys_seen * spec.num_heads * spec.head_dim


def attention_flops(spec: ModelSpec, seq_len: int) -> int:
  """A query sees seq_len keys (or the window) plus the persistent slots."""
  seen = min(seq_len, spec.attention_window or seq_len) + spec.persistent_tokens
  return attention_core_flops(spec, seen)


def gate_shape(spec: ModelSpec) -> tuple[int, ...]:
  return (spec.num_heads,) if spec.gate == "headwise" else (spec.num_heads, spec.head_dim)


def gated_attention_params(spec: ModelSpec) -> int:
  return attention_params(spec) + (spec.d_model + 1) * math.prod(gate_shape(spec))


def gated_attention_flops(spec: ModelSpec, seq_len: int) -> int:
  return attention_flops(spec, seq_len) + 6 * spec.d_model * math.prod(gate_shape(spec))


# ---------------------------------------------------------------------------
# Titans.
# ---------------------------------------------------------------------------


def memory_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
  """Per-head memory MLP layers: head_dim -> memory_width -> ... -> head_dim."""
  width, depth = spec.titans.memory_width, spec.titans.memory_depth
  dims = [spec.head_dim] + [width] * (depth - 1) + [spec.head_dim]
  return list(zip(dims[:-1], dims[1:]))


def neural_memory_params(spec: ModelSpec) -> int:
  """q/k/v/o projections, three width-4 convs, three gates with biases, initial memory."""
  d, n, h = spec.d_model, spec.num_heads, spec.head_dim
  memory = n * sum(a * b for a, b in memory_shapes(spec))
  return 4 * d * n * h + 3 * 4 * n * h + 3 * (d + 1) * n + memory


def neural_memory_flops(spec: ModelSpec) -> int:
  """Approximate: projections, plus per head and memory layer the key pass, its backward,
  the read and the state update (4 matmuls with the memory weights) and the chunk-quadratic
  mixing (chunk_size x (in + out))."""
  d, n, h = spec.d_model, spec.num_heads, spec.head_dim
  chunk = spec.titans.chunk_size
  inner = sum(4 * a * b + 2 * chunk * (a + b) for a, b in memory_shapes(spec))
  return 6 * (4 * d * n * h + 3 * d * n) + 6 * n * inner


def titans_params(spec: ModelSpec) -> int:
  mix = (spec.d_model + 1) * spec.d_model if spec.titans.variant == "mag" else 0
  return neural_memory_params(spec) + attention_params(spec) + mix


def titans_flops(spec: ModelSpec, seq_len: int) -> int:
  """MAG adds its gate; MAC attends within a segment over [h | segment] and reads the
  memory twice (h and the output), counted as a second memory pass."""
  memory = neural_memory_flops(spec)
  if spec.titans.variant == "mac":
    seen = 2 * spec.titans.chunk_size + spec.persistent_tokens
    return 2 * memory + attention_core_flops(spec, seen)
  mix = 6 * spec.d_model * spec.d_model if spec.titans.variant == "mag" else 0
  return memory + attention_flops(spec, seq_len) + mix


# ---------------------------------------------------------------------------
# MLPs: SwiGLU, and Hope's Continuum Memory System.
# ---------------------------------------------------------------------------


def swiglu_params(spec: ModelSpec, width: int) -> int:
  return 3 * spec.d_model * width


def swiglu_flops(spec: ModelSpec, width: int) -> int:
  return 6 * swiglu_params(spec, width)


def level_widths(spec: ModelSpec, width: int) -> list[int]:
  """Split a layer's CMS width over the levels exactly, in multiples of hope.level_tile."""
  hope = spec.hope
  shares = [Fraction(f).limit_denominator(1000) * width for f in hope.width_fractions]
  if any(s.denominator != 1 or s % hope.level_tile or s <= 0 for s in shares):
    raise ConfigError(
      f"a CMS width of {width} does not split into model.hope.width_fractions="
      f"{hope.width_fractions} in multiples of model.hope.level_tile={hope.level_tile}: "
      "make model.taper.tile (and model.mlp_width) a multiple of level_tile / smallest fraction"
    )
  return [int(s) for s in shares]


def cms_params(spec: ModelSpec, width: int) -> int:
  """Every level's SwiGLU, plus a d x d value map per in-context level."""
  in_context = sum(1 for c in spec.hope.chunk_sizes if c)
  return 3 * spec.d_model * width + in_context * spec.d_model**2


def cms_flops(spec: ModelSpec, width: int) -> int:
  """Outer training FLOPs, plus each in-context level's inner forward and backward (about
  3x its forward) and value map, counted 3x again for the outer pass."""
  d = spec.d_model
  total = 6 * 3 * d * width
  for w, chunk in zip(level_widths(spec, width), spec.hope.chunk_sizes):
    if chunk:
      total += 6 * (3 * 3 * d * w + d * d)
  return total


# ---------------------------------------------------------------------------
# One entry per backbone, and whole-model totals.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BackboneCosts:
  mixer_params: Callable[[ModelSpec], int]
  mixer_flops: Callable[[ModelSpec, int], int]  # (spec, seq_len)
  mlp_params: Callable[[ModelSpec, int], int]  # (spec, width)
  mlp_flops: Callable[[ModelSpec, int], int]  # (spec, width)


SWIGLU = dict(mlp_params=swiglu_params, mlp_flops=swiglu_flops)
COSTS = {
  "transformer": BackboneCosts(attention_params, attention_flops, **SWIGLU),
  "gated_attention": BackboneCosts(gated_attention_params, gated_attention_flops, **SWIGLU),
  "titans": BackboneCosts(titans_params, titans_flops, **SWIGLU),
  "hope_attention": BackboneCosts(attention_params, attention_flops, cms_params, cms_flops),
}


def mlp_params(spec: ModelSpec, width: int) -> int:
  return COSTS[spec.backbone].mlp_params(spec, width)


def layer_params(spec: ModelSpec, width: int) -> int:
  """Mixer + MLP + the block's two norm scales."""
  return COSTS[spec.backbone].mixer_params(spec) + mlp_params(spec, width) + 2 * spec.d_model


def embedding_params(spec: ModelSpec) -> int:
  """Token table, the head unless tied, and the final norm."""
  tables = 1 if spec.tie_embeddings else 2
  return tables * spec.vocab_size * spec.d_model + spec.d_model


def total_params(spec: ModelSpec, widths: list[int]) -> int:
  return embedding_params(spec) + sum(layer_params(spec, w) for w in widths)


def layer_flops_per_token(spec: ModelSpec, width: int, seq_len: int) -> int:
  costs = COSTS[spec.backbone]
  return costs.mixer_flops(spec, seq_len) + costs.mlp_flops(spec, width)


def flops_per_token(spec: ModelSpec, widths: list[int], seq_len: int) -> int:
  """Whole-model training FLOPs per token: every layer plus the output head."""
  head = 6 * spec.d_model * spec.vocab_size
  return head + sum(layer_flops_per_token(spec, w, seq_len) for w in widths)
