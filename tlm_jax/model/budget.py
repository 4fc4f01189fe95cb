"""Whole-model params, FLOPs and KV-cache bytes: the budget a taper must meet (pure Python).

Every total is a sum over layers of the backbone's per-layer costs (its
registry entry) at each layer's residual width and MLP width, plus the
embedding and head at the first and last residual widths. One function per
total, and it always takes the residual widths, so an X-shaped model
(tlm_jax/xshape.py) is never counted as if its stream were uniform:
`taper.plan(spec)` gives both width lists.
"""

from __future__ import annotations

from collections.abc import Sequence

from tlm_jax.model import registry
from tlm_jax.spec import ModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def mlp_params(spec: ModelSpec, width: int) -> int:
  return registry.get(spec.backbone).costs.mlp_params(spec, width)


def layer_params(spec: ModelSpec, width: int) -> int:
  """Mixer + MLP + the block's two norm scales, for a block at residual width spec.d_model."""
  return (
    registry.get(spec.backbone).costs.mixer_params(spec)
    + mlp_params(spec, width)
    + (2 * spec.d_model)
  )


def layer_flops_per_token(spec: ModelSpec, width: int, seq_len: int) -> int:
  layer_costs = registry.get(spec.backbone).costs
  return layer_costs.mixer_flops(spec, seq_len) + layer_costs.mlp_flops(spec, width)


def embedding_params(spec: ModelSpec, residual_widths: Sequence[int]) -> int:
  """Token table at the first block's width; the head (unless tied) and final norm at the
  last's."""
  first, last = residual_widths[0], residual_widths[-1]
  head = 0 if spec.tie_embeddings else spec.vocab_size * last
  return spec.vocab_size * first + head + last


def total_params(spec: ModelSpec, widths: Sequence[int], residual_widths: Sequence[int]) -> int:
  """Every parameter of the decoder with these MLP and residual widths per layer."""
  layers = sum(layer_params(spec.at_width(d), f) for f, d in zip(widths, residual_widths))
  return embedding_params(spec, residual_widths) + layers


def flops_per_token(
  spec: ModelSpec, widths: Sequence[int], residual_widths: Sequence[int], seq_len: int
) -> int:
  """Training FLOPs per token (model/costs.py's convention): every layer plus the head."""
  head = 6 * residual_widths[-1] * spec.vocab_size
  return head + sum(
    layer_flops_per_token(spec.at_width(d), f, seq_len) for f, d in zip(widths, residual_widths)
  )


def kv_cache_bytes_per_token(spec: ModelSpec, residual_widths: Sequence[int]) -> int:
  """Keys and values every layer caches per token in `model.dtype`."""
  per_value = DTYPE_BYTES[spec.dtype]
  return sum(2 * spec.at_width(d).num_kv_heads * spec.head_dim * per_value for d in residual_widths)
