"""Parameter and FLOP counts per layer, from the model spec alone (pure Python, no JAX).

Tapered layers differ, so totals are per-layer sums. FLOPs are training FLOPs
(forward + backward = 3x forward) per token of the matmuls, the convention MFU
uses; causal attention counts only the query-key pairs the mask lets through
(about half the square, as MaxText counts it), not the masked half a dense
kernel also computes (`masked_attention_flops`). tests/test_flops.py checks
every backbone against XLA's count of the compiled train step. Each
backbone's mixer and MLP costs are one `BackboneCosts` in its registry entry
(model/registry.py); whole-model totals are model/budget.py's. The modules in
this package hold exactly the parameters counted here (tests build them and
compare).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction

from tlm_jax.errors import ConfigError
from tlm_jax.spec import ModelSpec

# ---------------------------------------------------------------------------
# Attention (Transformer, Gated Attention, Hope-attention, and inside Titans).
# ---------------------------------------------------------------------------


def attention_projection_params(spec: ModelSpec) -> int:
  return 2 * spec.d_model * spec.head_dim * (spec.num_heads + spec.num_kv_heads)


def attention_params(spec: ModelSpec) -> int:
  persistent = 2 * spec.persistent_tokens * spec.num_kv_heads * spec.head_dim
  return attention_projection_params(spec) + persistent


def visible_keys(spec: ModelSpec, seq_len: int) -> Fraction:
  """Keys per query that the causal mask lets through, averaged over a sequence: t + 1 at
  position t (at most the window), plus the persistent slots every query sees."""
  window = min(spec.attention_window or seq_len, seq_len)
  causal = window * (window + 1) // 2 + (seq_len - window) * window
  return Fraction(causal, seq_len) + spec.persistent_tokens


def attention_flops(spec: ModelSpec, seq_len: int) -> int:
  """Projections at 6 per weight; scores and weighted values, 2 matmuls of head_dim per
  visible key and head, x3 for training. Causal attention counts only the keys a query
  sees, about half the square (the MFU convention MaxText uses): a fused causal kernel
  skips the masked half, while XLA's dense kernel computes it and masks it, so the
  compiled step's own count is higher by masked_attention_flops."""
  scores = 12 * visible_keys(spec, seq_len) * spec.num_heads * spec.head_dim
  return 6 * attention_projection_params(spec) + round(scores)


def masked_attention_flops(spec: ModelSpec, seq_len: int) -> int:
  """What a dense kernel computes per token beyond attention_flops: the masked scores and
  values of the full (persistent + seq_len)-wide square."""
  hidden = spec.persistent_tokens + seq_len - visible_keys(spec, seq_len)
  return round(12 * hidden * spec.num_heads * spec.head_dim)


def gate_shape(spec: ModelSpec) -> tuple[int, ...]:
  return (spec.num_heads,) if spec.gate == "headwise" else (spec.num_heads, spec.head_dim)


def gated_attention_params(spec: ModelSpec) -> int:
  """Attention plus the gate projection (and its bias where model.gate_bias asks)."""
  bias = 1 if spec.gate_bias else 0
  return attention_params(spec) + (spec.d_model + bias) * math.prod(gate_shape(spec))


def gated_attention_flops(spec: ModelSpec, seq_len: int) -> int:
  return attention_flops(spec, seq_len) + 6 * spec.d_model * math.prod(gate_shape(spec))


# ---------------------------------------------------------------------------
# Titans.
# ---------------------------------------------------------------------------


CONV_WIDTH = 4  # taps of the depthwise causal conv after the memory's q/k/v projections


def memory_shapes(spec: ModelSpec) -> list[tuple[int, int]]:
  """Per-head memory MLP layers: head_dim -> memory_width -> ... -> head_dim."""
  width, depth = spec.titans.memory_width, spec.titans.memory_depth
  dims = [spec.head_dim] + [width] * (depth - 1) + [spec.head_dim]
  return list(zip(dims[:-1], dims[1:]))


def neural_memory_params(spec: ModelSpec) -> int:
  """q/k/v/gate/o projections, three depthwise convs, three gates with biases, the output
  norm, initial memory."""
  d, n, h = spec.d_model, spec.num_heads, spec.head_dim
  memory = n * sum(a * b for a, b in memory_shapes(spec))
  return 5 * d * n * h + 3 * CONV_WIDTH * n * h + 3 * (d + 1) * n + h + memory


def titans_combine_params(spec: ModelSpec) -> int:
  """mag and mac: two norm scales (mag_combine="mix": a d x d gate with bias instead)."""
  d, titans = spec.d_model, spec.titans
  if titans.variant == "mag" and titans.mag_combine == "mix":
    return (d + 1) * d
  return 2 * d if titans.variant in ("mag", "mac") else 0


def titans_params(spec: ModelSpec) -> int:
  """Memory, attention (no key/value slots), persistent tokens (d each), combine."""
  attention = attention_params(dataclasses.replace(spec, persistent_tokens=0))
  persistent = spec.persistent_tokens * spec.d_model
  return neural_memory_params(spec) + attention + persistent + titans_combine_params(spec)


def memory_inner_flops(spec: ModelSpec) -> int:
  """Forward FLOPs per token of one head's chunked memory step (memory_chunk): per memory
  layer (in a, out b) the key pass, its backward (not for the first layer), the read through
  M_c and S_c, the two state updates (2ab each), and the chunk-quadratic terms (2 C (a + b));
  plus the C x C decay product (2 C^2) and the momentum weights (2 C)."""
  chunk, shapes = spec.titans.chunk_size, memory_shapes(spec)
  layers = sum(12 * a * b + 2 * chunk * (a + b) for a, b in shapes)
  return layers - 2 * shapes[0][0] * shapes[0][1] + 2 * chunk * chunk + 2 * chunk


def titans_flops(spec: ModelSpec, seq_len: int) -> int:
  """Training FLOPs per token (3x forward, matmuls only) of the Titans mixer, counting what
  runs per sequence of seq_len: the memory over the persistent tokens too (and the neutral
  tokens that pad them to a chunk), attention over the keys each query's mask lets through
  (so causal attention counts half the square, the MFU convention), MAC's retrieval read
  and the keys and values of its [persistent | retrieved | segment] context."""
  d, n, kv, h = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
  titans, prefix = spec.titans, spec.persistent_tokens
  heads_proj = 2 * d * n * h  # one d -> (heads, head_dim) projection, per token
  # q, k, v, output gate, w_o; the three width-4 depthwise convs; eta, theta, alpha.
  memory_tokens = 5 * heads_proj + 3 * 2 * CONV_WIDTH * n * h + 3 * 2 * d * n
  inner = n * memory_inner_flops(spec)
  queries = 2 * heads_proj  # attention q and w_o
  keys = 2 * 2 * d * kv * h  # attention k and v, per context token
  scores = 4 * n * h  # scores and weighted values, per visible key
  if titans.variant == "mac":
    size = titans.segment_size
    retrieval = heads_proj + n * sum(2 * a * b for a, b in memory_shapes(spec)) + 2 * heads_proj
    attention = queries + keys * Fraction(prefix + 2 * size, size) + scores * (prefix + size + 1)
    total = retrieval + attention + memory_tokens + inner
  else:
    window = spec.attention_window or seq_len
    visible = Fraction(sum(prefix + min(t + 1, window) for t in range(seq_len)), seq_len)
    tokens = Fraction(seq_len + prefix, seq_len)
    padded = Fraction(seq_len + prefix + -prefix % titans.chunk_size, seq_len)
    attention = queries + keys * tokens + scores * visible
    mix = 2 * d * d if titans.variant == "mag" and titans.mag_combine == "mix" else 0
    total = memory_tokens * tokens + inner * padded + attention + mix
  return round(3 * total)


# ---------------------------------------------------------------------------
# MLPs: SwiGLU, and Hope's Continuum Memory System.
# ---------------------------------------------------------------------------


def swiglu_params(spec: ModelSpec, width: int) -> int:
  return 3 * spec.d_model * width


def swiglu_flops(spec: ModelSpec, width: int) -> int:
  return 6 * swiglu_params(spec, width)


def level_widths(spec: ModelSpec, width: int) -> list[int]:
  """Split a layer's CMS width over the levels in multiples of hope.level_tile: in-context
  levels get their hope.width_fractions share, the slow (last) level the rest.

  A share is the uniform layer's (the fraction of model.mlp_width, to the nearest tile)
  plus the fraction of this layer's departure from it, rounded symmetrically (half away
  from zero). So any tile multiple splits (the taper keeps its own 128-wide steps), and
  for a taper antisymmetric about the middle layer (cosine, linear, sigmoid and their
  reverses) the wide and narrow layers' roundings cancel: the in-context levels, and so
  the FLOPs, total exactly the uniform model's. Params depend on the total width only.
  """
  hope, tile = spec.hope, spec.hope.level_tile
  tiles, base = width // tile, spec.mlp_width / tile

  def nearest(x: float) -> int:  # half away from zero: nearest(-x) == -nearest(x)
    return int(math.copysign(math.floor(abs(x) + 0.5), x))

  fast = [
    max(1, nearest(f * base) + nearest(f * (tiles - base))) for f in hope.width_fractions[:-1]
  ]
  if width % tile or tiles - sum(fast) < 1:
    raise ConfigError(
      f"a CMS width of {width} does not split into model.hope.width_fractions="
      f"{hope.width_fractions} in multiples of model.hope.level_tile={tile} with at least "
      "one tile per level: raise model.mlp_width, or lower model.hope.level_tile (and "
      "model.taper.tile)"
    )
  return [t * tile for t in fast + [tiles - sum(fast)]]


def cms_params(spec: ModelSpec, width: int) -> int:
  """Every level's SwiGLU, plus a d x d value map per in-context level."""
  in_context = sum(1 for c in spec.hope.chunk_sizes if c)
  return 3 * spec.d_model * width + in_context * spec.d_model**2


def cms_flops(spec: ModelSpec, width: int) -> int:
  """Training FLOPs per token (3x forward). The slow level is a SwiGLU (6 dw forward). An
  in-context level runs per token its SwiGLU forward (6 dw, shared with the inner
  gradient), the value map (2 d^2) and the inner backward to the weights (8 dw: the down
  projection's gradient and input gradient, then the gate's and up's); and per chunk of
  C tokens it updates its 3 dw weights, 7 FLOPs each (step, the trust region's two norms
  and scale, subtract; 2 without the trust region): elementwise, but the model's own
  computation, as Titans' memory state updates are."""
  d, total = spec.d_model, Fraction(0)
  update = 7 if spec.hope.max_step else 2
  for w, chunk in zip(level_widths(spec, width), spec.hope.chunk_sizes):
    if chunk:
      total += 3 * (14 * d * w + 2 * d * d + Fraction(update * 3 * d * w, chunk))
    else:
      total += 18 * d * w
  return round(total)


@dataclasses.dataclass(frozen=True)
class BackboneCosts:
  """A backbone's per-layer costs (its registry entry holds one; model/budget.py sums them)."""

  mixer_params: Callable[[ModelSpec], int]
  mixer_flops: Callable[[ModelSpec, int], int]  # (spec, seq_len)
  mlp_params: Callable[[ModelSpec, int], int]  # (spec, width)
  mlp_flops: Callable[[ModelSpec, int], int]  # (spec, width)
