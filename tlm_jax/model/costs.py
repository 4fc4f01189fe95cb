"""Parameter and FLOP counts per layer, from the config alone (no model is built).

Tapered layers differ, so totals are per-layer sums. FLOPs are training FLOPs
(forward + backward = 3x forward) per token, the convention MFU uses.
"""

from __future__ import annotations

from typing import Any

from tlm_jax.model.lm import MIXERS, mlp_class


def mlp_params(cfg: Any, width: int) -> int:
  return mlp_class(cfg).param_count(cfg, width)


def layer_params(cfg: Any, width: int) -> int:
  """Mixer + MLP + the block's two norm scales."""
  return MIXERS[cfg.backbone].param_count(cfg) + mlp_params(cfg, width) + 2 * cfg.d_model


def embedding_params(cfg: Any) -> int:
  """Token table, the head unless tied, and the final norm."""
  tables = 1 if cfg.tie_embeddings else 2
  return tables * cfg.vocab_size * cfg.d_model + cfg.d_model


def total_params(cfg: Any, widths: list[int]) -> int:
  return embedding_params(cfg) + sum(layer_params(cfg, w) for w in widths)


def layer_flops_per_token(cfg: Any, width: int, seq_len: int) -> int:
  return MIXERS[cfg.backbone].flops_per_token(cfg, seq_len) + mlp_class(cfg).flops_per_token(cfg, width)


def flops_per_token(cfg: Any, widths: list[int], seq_len: int) -> int:
  """Whole-model training FLOPs per token: every layer plus the output head."""
  head = 6 * cfg.d_model * cfg.vocab_size
  return head + sum(layer_flops_per_token(cfg, w, seq_len) for w in widths)
