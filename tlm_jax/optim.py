"""AdamW with warmup + cosine / constant / warmup-stable-decay, clipping and a decay mask."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate_schedule(tcfg: Any) -> optax.Schedule:
  """Linear warmup, then cosine to min_lr_ratio * lr, constant, or WSD's final linear decay.

  `tcfg` is a validated train section (config.validate_train).
  """
  peak, warmup, steps = tcfg.learning_rate, tcfg.warmup_steps, tcfg.steps
  floor = peak * tcfg.min_lr_ratio
  ramp = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if tcfg.lr_schedule == "constant":
    rest = optax.constant_schedule(peak)
  elif tcfg.lr_schedule == "cosine":
    rest = optax.cosine_decay_schedule(peak, steps - warmup, alpha=tcfg.min_lr_ratio)
  else:
    decay = max(1, int(tcfg.decay_fraction * steps))
    stable = max(0, steps - warmup - decay)
    rest = optax.join_schedules(
      [optax.constant_schedule(peak), optax.linear_schedule(peak, floor, decay)], [stable]
    )
  return optax.join_schedules([ramp, rest], [warmup])


def decay_mask(params: Any) -> Any:
  """Weight decay on weights and embeddings; norm `scale`s and biases (`b_*`) are excluded."""

  def decays(path, _):
    name = str(next(k.key for k in reversed(path) if isinstance(k, jax.tree_util.DictKey)))
    return not (name == "scale" or name.startswith("b_"))

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(tcfg: Any) -> optax.GradientTransformation:
  return optax.chain(
    optax.clip_by_global_norm(tcfg.grad_clip),
    optax.adamw(
      learning_rate_schedule(tcfg),
      b1=tcfg.b1,
      b2=tcfg.b2,
      eps=tcfg.eps,
      weight_decay=tcfg.weight_decay,
      mask=decay_mask,
    ),
  )
