"""The X-shaped residual stream (the ><former, PAPERS.md section 3), and its budget.

Layer l runs at its own residual width d_l: wide early and late, narrow in the
middle. Blocks are resized between each other without parameters (model/lm.py):
narrowing keeps x[..., :d]; widening restores the missing coordinates from the
most recent earlier hidden state that had them, else zeros. Here, in pure
Python: the schedule, the per-layer spec, and the base width solved so the
whole model's params match its uniform twin's.

Choices the paper does not publish (config fields, `model.residual.*`): the
profile is a raised cosine, r(x) = middle + (ends - middle) (1 + cos 2 pi x) / 2
for x = l / (L - 1), so the first and last layers sit at `ends` and the middle
at `middle` times the base width; attention keeps its head_dim and scales its
head count with d_l (the kv-group size stays), so widths are rounded to
lcm(`tile`, head_dim x query heads per kv head); each layer's MLP width is the
taper's width for that layer scaled by d_l / d_model (rounded to the taper tile).
"""

from __future__ import annotations

import math

from tlm_jax.errors import ConfigError
from tlm_jax.model import budget
from tlm_jax.spec import ModelSpec


def profile(num_layers: int, ends: float, middle: float) -> list[float]:
  """Width ratio per layer: `ends` at both ends, `middle` at mid-depth."""
  if num_layers == 1:
    return [ends]
  xs = [l / (num_layers - 1) for l in range(num_layers)]
  return [middle + (ends - middle) * (1 + math.cos(2 * math.pi * x)) / 2 for x in xs]


def residual_tile(spec: ModelSpec) -> int:
  """Residual widths must be whole numbers of kv groups of heads, and tile multiples."""
  group = spec.num_heads // spec.num_kv_heads
  return math.lcm(spec.residual.tile, spec.head_dim * group)


def scaled_mlp_widths(
  spec: ModelSpec, mlp_widths: list[int], residual_widths: list[int], multiple: int
) -> list[int]:
  return [
    max(multiple, round(f * d / spec.d_model / multiple) * multiple)
    for f, d in zip(mlp_widths, residual_widths)
  ]


def widths(spec: ModelSpec, mlp: list[int], multiple: int) -> tuple[list[int], list[int]]:
  """(residual width, MLP width) per layer, given the taper's MLP widths at d_model and
  the MLP rounding multiple.

  Uniform: d_model everywhere and the taper's widths. X-shaped: the base
  width whose rounded schedule brings total params closest to the uniform
  twin's, then MLP tiles close the rest (`trim_mlp`).
  """
  res = spec.residual
  if res.schedule == "uniform":
    return [spec.d_model] * spec.num_layers, mlp
  tile = residual_tile(spec)
  if res.schedule == "custom":
    if len(res.widths) != spec.num_layers or any(w <= 0 or w % tile for w in res.widths):
      raise ConfigError(
        f"model.residual.widths={res.widths} needs {spec.num_layers} positive multiples of {tile} "
        f"(model.residual.tile and head_dim x query heads per kv head)"
      )
    residual = list(res.widths)
    return residual, scaled_mlp_widths(spec, mlp, residual, multiple)
  target = budget.total_params(spec, mlp, [spec.d_model] * spec.num_layers)
  ratios = profile(spec.num_layers, res.ends, res.middle)
  best = None
  for base in range(tile, 4 * spec.d_model + 1, max(1, tile // 8)):
    residual = [max(tile, round(base * r / tile) * tile) for r in ratios]
    scaled = scaled_mlp_widths(spec, mlp, residual, multiple)
    miss = abs(budget.total_params(spec, scaled, residual) - target)
    if best is None or miss < best[0]:
      best = (miss, residual, scaled)
  return best[1], trim_mlp(spec, best[2], best[1], target, multiple)


def trim_mlp(
  spec: ModelSpec, mlp_widths: list[int], residual_widths: list[int], target: int, multiple: int
) -> list[int]:
  """Close what the coarse residual tiles leave of the budget with MLP tiles (much finer),
  one tile per layer per pass, widest layers first, while each step brings the total closer:
  the change spreads evenly instead of piling onto one layer."""
  mlp = list(mlp_widths)
  total = budget.total_params(spec, mlp, residual_widths)
  order = sorted(range(len(mlp)), key=lambda l: -mlp[l])
  improved = True
  while improved:
    improved = False
    for l in order:
      sign = 1 if target > total else -1
      layer = spec.at_width(residual_widths[l])
      new = mlp[l] + sign * multiple
      if new < multiple:
        continue
      change = budget.mlp_params(layer, new) - budget.mlp_params(layer, mlp[l])
      if abs(total + change - target) < abs(total - target):
        mlp[l], total, improved = new, total + change, True
  return mlp
