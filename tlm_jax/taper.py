"""Per-layer MLP widths under a fixed budget (the TLM taper).

A schedule gives each layer l an ideal real width; rounding to tile multiples
then breaks the budget slightly, so `repair_to_budget` picks integer tile counts
that sum exactly to the uniform model's total while staying monotone wherever
the ideal schedule is. Everything here is pure Python: no JAX.

Run `python -m tlm_jax.taper --config configs/tlm_transformer.py:124m` for the
per-layer table and the parity check against the uniform twin.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from tlm_jax import cli, presets, xshape
from tlm_jax import config as config_lib
from tlm_jax.errors import ConfigError
from tlm_jax.model import budget
from tlm_jax.spec import SMOOTH_SCHEDULES, ModelSpec, TaperSpec


def rounding_multiple(tile: int, tensor_parallel: int = 1) -> int:
  """Widths must be tile multiples and split evenly over the tensor axis."""
  return math.lcm(tile, max(1, tensor_parallel))


def _logistic(z: float) -> float:
  """1 / (1 + e^-z) without overflow for steep sigmoids."""
  return 1 / (1 + math.exp(-z)) if z >= 0 else math.exp(z) / (1 + math.exp(z))


def _profile(
  schedule: str, num_layers: int, start: float, end: float, steepness: float
) -> list[float]:
  """Width ratios per layer for the smooth schedules (PAPERS.md section 1).

  With the L-1 denominator each profile is antisymmetric about the middle
  layer, so its mean is exactly (start + end) / 2.
  """
  if num_layers == 1:
    return [(start + end) / 2]
  out = []
  for l in range(num_layers):
    x = l / (num_layers - 1)
    if schedule == "cosine":
      weight = (1 + math.cos(math.pi * x)) / 2
    elif schedule == "linear":
      weight = 1 - x
    else:  # sigmoid, rescaled so the first layer gets start and the last end
      lo, hi = _logistic(-steepness / 2), _logistic(steepness / 2)
      weight = 1 - (_logistic(steepness * (x - 0.5)) - lo) / (hi - lo)
    out.append(end + (start - end) * weight)
  return out


def split_evenly(num_layers: int, parts: int) -> list[int]:
  """Contiguous group sizes, larger first (10 layers, 3 parts -> 4,3,3); no empty groups."""
  base, extra = divmod(num_layers, parts)
  sizes = [base + 1] * extra + [base] * (parts - extra)
  return [n for n in sizes if n > 0]


def ideal_widths(
  spec: TaperSpec, num_layers: int, base_width: int
) -> tuple[list[float], list[int]]:
  """Real-valued widths meeting the budget exactly, and the group sizes.

  Layers in one group must share a width (one group per layer except for
  `stepped`). Returns (ideal width per group, layers per group).
  """
  if spec.schedule == "uniform":
    return [float(base_width)] * num_layers, [1] * num_layers
  if spec.schedule in SMOOTH_SCHEDULES:
    ratios, sizes = (
      _profile(spec.schedule, num_layers, spec.start, spec.end, spec.steepness),
      [1] * num_layers,
    )
  elif spec.schedule == "thirds":
    ratios, sizes = [], [1] * num_layers
    for part, size in enumerate(split_evenly(num_layers, 3)):
      ratios += [spec.thirds[part]] * size
  elif spec.schedule == "stepped":
    fine = _profile(spec.step_schedule, num_layers, spec.start, spec.end, spec.steepness)
    sizes = split_evenly(num_layers, min(spec.steps, num_layers))
    ratios, first = [], 0
    for size in sizes:
      ratios.append(sum(fine[first : first + size]) / size)
      first += size
  else:
    raise ConfigError(f"model.taper.schedule={spec.schedule!r} has no ideal profile")
  mean = sum(r * n for r, n in zip(ratios, sizes)) / num_layers
  if spec.renormalize == "scale":
    ratios = [r / mean for r in ratios]
  else:
    ratios = [r + 1 - mean for r in ratios]
    if min(ratios) <= 1e-9:  # zero up to float noise, whichever end the profile starts at
      raise ConfigError(
        f"model.taper.renormalize='shift' drives a layer's width to {min(ratios):.3f}x of "
        "the base: the ratios cannot meet the budget this way; use renormalize='scale' "
        "or ratios with start + end closer to 2"
      )
  return [r * base_width for r in ratios], sizes


def _direction(values: Sequence[float]) -> int:
  """-1 if non-increasing, +1 if non-decreasing, 0 if neither (or constant: 0 too)."""
  tol = 1e-9 * max(1.0, max(abs(v) for v in values))
  down = all(b <= a + tol for a, b in zip(values, values[1:]))
  up = all(b >= a - tol for a, b in zip(values, values[1:]))
  if down and up:
    return 0
  return -1 if down else (1 if up else 0)


# The repair sees the ideal rounded to 1/GRID of a tile: far finer than any width choice,
# far coarser than float noise, so choices equally good in exact arithmetic tie exactly.
GRID = 2**24


def repair_to_budget(
  ideal: Sequence[float], sizes: Sequence[int], total: int, multiple: int
) -> list[int]:
  """Integer widths (multiples of `multiple`, at least one multiple each) per group.

  Chooses, per group, a tile count near the ideal (within the largest group
  size of floor/ceil, so groups of different sizes can still add up), so
  that sum(size * width) == total exactly, the sequence is monotone wherever
  `ideal` is, and the squared error to the ideal (weighted by group size) is
  smallest. A dynamic program over groups with state (running total, last
  width): small because each group has few candidates.

  Ties. The error is computed in integers on the ideal rounded to 1/GRID of a
  tile, so equally good choices tie exactly whatever float noise the ideal
  carries. The groups are read from the end whose ideal is larger
  (lexicographically; as given for a palindrome), and a tie goes to the
  smallest widths first in that reading. So the repair does not depend on the
  order the layers are listed in: a reversed ideal gives the reversed widths,
  and a taper and its mirror image (`cosine` 1.5->0.5, `reverse` 0.5->1.5) get
  mirrored widths. On a monotone taper a tie between the two ends rounds the
  wide end down and the narrow end up, towards the base width.
  """
  if total % multiple:
    raise ConfigError(
      f"the MLP budget ({total} = layers x model.mlp_width) is not a multiple of the "
      f"rounding multiple {multiple} (model.taper.tile, and mesh.tensor when set)"
    )
  ideal, sizes = list(ideal), list(sizes)
  units = [round(w * GRID / multiple) for w in ideal]  # in 1/GRID tiles
  flip = list(zip(units, sizes))[::-1] > list(zip(units, sizes))
  if flip:
    ideal, sizes, units = ideal[::-1], sizes[::-1], units[::-1]
  target = total // multiple
  direction = _direction(ideal)
  reach = max(sizes)
  options = []
  for u in units:
    low = max(1, u // GRID - reach)
    options.append(list(range(low, max(low, -(-u // GRID) + reach) + 1)))
  # Reachable range of the remaining groups, to prune hopeless partial sums.
  rest_lo, rest_hi = [0] * (len(units) + 1), [0] * (len(units) + 1)
  for g in range(len(units) - 1, -1, -1):
    rest_lo[g] = rest_lo[g + 1] + sizes[g] * options[g][0]
    rest_hi[g] = rest_hi[g + 1] + sizes[g] * options[g][-1]
  states: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {(0, 0): (0, ())}
  for g, (u, n) in enumerate(zip(units, sizes)):
    nxt: dict[tuple[int, int], tuple[int, tuple[int, ...]]] = {}
    for (run, last), (cost, path) in states.items():
      for w in options[g]:
        if g and direction < 0 and w > last or g and direction > 0 and w < last:
          continue
        new_run = run + n * w
        if not rest_lo[g + 1] <= target - new_run <= rest_hi[g + 1]:
          continue
        key, cand = (new_run, w), (cost + n * (w * GRID - u) ** 2, path + (w,))
        if key not in nxt or cand < nxt[key]:
          nxt[key] = cand
    states = nxt
  finals = [v for (run, _), v in states.items() if run == target]
  if not finals:
    raise ConfigError(
      f"no widths in multiples of {multiple} near the schedule sum exactly to the budget "
      f"{total}; the layers would need less than one tile each or the groups cannot "
      "add up: lower model.taper.tile, raise model.mlp_width, or (stepped) change "
      "model.taper.steps"
    )
  widths = [w * multiple for w in min(finals)[1]]
  return widths[::-1] if flip else widths


def layer_widths(
  spec: TaperSpec, num_layers: int, base_width: int, tensor_parallel: int = 1
) -> list[int]:
  """Per-layer MLP widths whose sum is exactly num_layers * base_width."""
  if num_layers < 1:
    raise ConfigError(f"model.num_layers={num_layers} must be at least 1")
  multiple = rounding_multiple(spec.tile, tensor_parallel)
  if base_width % multiple:
    suggestion = max(1, round(base_width / multiple)) * multiple
    raise ConfigError(
      f"model.mlp_width={base_width} is not a multiple of {multiple} "
      f"(model.taper.tile={spec.tile}, mesh.tensor={tensor_parallel}): the uniform twin "
      f"could not be built; use a multiple such as {suggestion}"
    )
  total = num_layers * base_width
  if spec.schedule == "custom":
    widths = list(spec.widths)
    if len(widths) != num_layers:
      raise ConfigError(
        f"model.taper.widths has {len(widths)} entries but model.num_layers={num_layers}"
      )
    bad = [w for w in widths if w <= 0 or w % multiple]
    if bad:
      raise ConfigError(
        f"model.taper.widths entries {bad} are not positive multiples of {multiple}"
      )
    if sum(widths) != total:
      raise ConfigError(
        f"model.taper.widths sum to {sum(widths)} but the budget is {total} "
        f"(model.num_layers x model.mlp_width): adjust them by {total - sum(widths)}"
      )
    return widths
  ideal, sizes = ideal_widths(spec, num_layers, base_width)
  group_widths = repair_to_budget(ideal, sizes, total, multiple)
  return [w for w, n in zip(group_widths, sizes) for _ in range(n)]


def model_widths(spec: ModelSpec, tensor_parallel: int = 1) -> list[int]:
  """Per-layer MLP widths of a model spec."""
  return layer_widths(spec.taper, spec.num_layers, spec.mlp_width, tensor_parallel)


def plan(spec: ModelSpec, tensor_parallel: int = 1) -> tuple[list[int], list[int]]:
  """(residual width, MLP width) per layer: the taper, and the X-shaped residual stream
  (tlm_jax/xshape.py) when model.residual asks for one."""
  multiple = rounding_multiple(spec.taper.tile, tensor_parallel)
  return xshape.widths(spec, model_widths(spec, tensor_parallel), multiple)


def widths_from_config(config: Any) -> list[int]:
  """Per-layer MLP widths for a full experiment config."""
  return model_widths(config_lib.model_spec(config), config_lib.tensor_parallel_size(config))


def uniform_twin(config: Any) -> Any:
  """The same experiment with every layer at the base width."""
  twin = config.copy_and_resolve_references()
  twin.model.taper.schedule = "uniform"
  twin.model.residual.schedule = "uniform"
  return twin


def describe(spec: TaperSpec) -> str:
  """The taper's label in reports and legends: its preset name (presets.TAPERS) where the
  fields match one, else the schedule and its ratios ('cosine 1.2->0.8')."""
  for name, fields in presets.TAPERS.items():
    if all(getattr(spec, k) == v for k, v in fields.items()):
      return name
  if spec.schedule in (*SMOOTH_SCHEDULES, "stepped"):
    return f"{spec.schedule} {spec.start:g}->{spec.end:g}"
  if spec.schedule == "thirds":
    return "thirds " + "/".join(f"{x:g}" for x in spec.thirds)
  return spec.schedule


def parity_report(config: Any) -> dict[str, Any]:
  """Per-layer params, FLOPs and KV-cache bytes of a config next to its uniform twin."""
  spec = config_lib.model_spec(config)
  twin = config_lib.model_spec(uniform_twin(config))
  tensor_parallel = config_lib.tensor_parallel_size(config)
  residual, widths = plan(spec, tensor_parallel)
  twin_residual, twin_widths = plan(twin, tensor_parallel)
  seq_len = config.train.seq_len
  layers = []
  for l, (d, w) in enumerate(zip(residual, widths)):
    layer = spec.at_width(d)
    layers.append(
      dict(
        layer=l,
        residual_width=d,
        width=w,
        ratio=w / spec.mlp_width,
        mlp_params=budget.mlp_params(layer, w),
        layer_params=budget.layer_params(layer, w),
        flops_per_token=budget.layer_flops_per_token(layer, w, seq_len),
        kv_cache_bytes_per_token=budget.kv_cache_bytes_per_token(spec, [d]),
      )
    )
  total = budget.total_params(spec, widths, residual)
  uniform_total = budget.total_params(twin, twin_widths, twin_residual)
  return dict(
    schedule=config.model.taper.schedule,
    residual_schedule=spec.residual.schedule,
    widths=widths,
    residual_widths=residual,
    layers=layers,
    total_params=total,
    uniform_total_params=uniform_total,
    param_difference=total - uniform_total,
    flops_per_token=budget.flops_per_token(spec, widths, residual, seq_len),
    uniform_flops_per_token=budget.flops_per_token(twin, twin_widths, twin_residual, seq_len),
    kv_cache_bytes_per_token=budget.kv_cache_bytes_per_token(spec, residual),
    uniform_kv_cache_bytes_per_token=budget.kv_cache_bytes_per_token(twin, twin_residual),
    seq_len=seq_len,
  )


def format_report(report: dict[str, Any]) -> str:
  lines = [
    f"{'layer':>5} {'resid':>6} {'width':>7} {'ratio':>6} {'mlp params':>13} "
    f"{'layer params':>13} {'FLOPs/token':>14} {'KV B/token':>10}"
  ]
  for row in report["layers"]:
    lines.append(
      f"{row['layer']:>5} {row['residual_width']:>6} {row['width']:>7} {row['ratio']:>6.3f} "
      f"{row['mlp_params']:>13,} {row['layer_params']:>13,} "
      f"{row['flops_per_token']:>14,} {row['kv_cache_bytes_per_token']:>10,}"
    )

  def versus(name: str, key: str) -> str:
    ours, twin = report[key], report[f"uniform_{key}"]
    return (
      f"{name:<26}{ours:>16,}   uniform twin {twin:>16,}   difference {ours - twin:+,} "
      f"({ours / twin - 1:+.2%})"
    )

  lines += [
    f"taper {report['schedule']}: {len(set(report['widths']))} distinct MLP widths; "
    f"residual {report['residual_schedule']}",
    versus("total params", "total_params"),
    versus(f"FLOPs/token (seq {report['seq_len']})", "flops_per_token"),
    versus("KV-cache bytes/token", "kv_cache_bytes_per_token"),
  ]
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  report = parity_report(_CONFIG.value)
  print(json.dumps(report) if _JSON.value else format_report(report))


if __name__ == "__main__":
  from absl import flags

  _CONFIG = cli.config_flag()
  _JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
  cli.run(main)
