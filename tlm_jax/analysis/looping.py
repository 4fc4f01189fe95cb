"""Training-free looping: re-run a mid-stack window of layers K times (arXiv 2605.23872).

    python -m tlm_jax.analysis.looping --workdir W [--size 4 --start -1 --max_loops 8]

With g the window's layers run once, from the window's input x_0:

    naive     x_{k+1} = g(x_k)                          (degrades, the paper's baseline)
    damped    x_{k+1} = x_k + (g(x_k) - x_k) / K
    anchored  out = beta * g(x_0) + (1 - beta) * x_K     (x_K damped; beta = 0.5)

K = 1 is the model itself for every variant. Validation perplexity vs K
(1..max_loops) at the default window (about 4 layers centred at 52.5% depth,
the middle of the paper's 45-60% band; a quarter of the stack at most on
shallow models), and vs window position at K = --position_loops. The window
start, K, step and beta are traced values, so one compiled program serves
every point of both sweeps.

In an X-shaped model each block runs at its own residual width, resized to and
from the stream as in the decoder (tlm_jax/analysis/blocks.py), and x is the
whole stream at the widest residual width (zeros where nothing has written
yet, as the decoder widens with): damping and anchoring mix whole streams, and
coordinates the window's blocks do not read pass through every loop unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from tlm_jax import cli, restore
from tlm_jax.analysis import blocks, load
from tlm_jax.errors import ConfigError
from tlm_jax.model import lm

VARIANTS = ("naive", "damped", "anchored")
BETA = 0.5
CENTRE = 0.525  # fraction of depth the default window is centred on


def damped_loop(
  g: Callable[[jax.Array], jax.Array],
  x_BTD: jax.Array,
  loops: jax.Array | int,
  step: jax.Array | float,
  anchor: jax.Array | float,
) -> jax.Array:
  """x_{k+1} = x_k + step * (g(x_k) - x_k) for `loops` steps, then anchor * g(x_0) +
  (1 - anchor) * x_K. step 1 applies g exactly (naive re-application)."""

  def body(k, carry):
    x, g0 = carry
    gx = g(x)
    x = jnp.where(step == 1, gx, x + step * (gx - x))
    return x, jnp.where(k == 0, gx, g0)

  x, g0 = jax.lax.fori_loop(0, loops, body, (x_BTD, jnp.zeros_like(x_BTD)))
  return anchor * g0 + (1 - anchor) * x


def variant_args(variant: str, loops: int, beta: float = BETA) -> tuple[int, float, float]:
  """(loops, step, anchor) of a variant."""
  step = 1.0 if variant == "naive" else 1.0 / loops
  return loops, step, beta if variant == "anchored" else 0.0


def default_window(num_layers: int) -> tuple[int, int]:
  """(start, size): about 4 layers (at most a quarter of the stack) centred at 52.5% depth."""
  size = min(4, max(1, num_layers // 4))
  start = int(np.clip(round(CENTRE * num_layers - size / 2), 0, num_layers - size))
  return start, size


def looped_logits(
  model: lm.Decoder,
  tokens_BT: jax.Array,
  start: jax.Array,
  loops: jax.Array,
  step: jax.Array,
  anchor: jax.Array,
  *,
  size: int,
) -> jax.Array:
  """Logits with layers [start, start + size) looped by `damped_loop`; the rest run once."""
  num_layers = len(model.blocks)
  positions_BT = blocks.positions_like(tokens_BT)
  layers = jnp.arange(num_layers)

  def run_outside(x_BTD, lo, hi):  # layers in [lo, hi) once, the others skipped
    def one(x, l):
      index = jnp.where((l >= lo) & (l < hi), l, num_layers)
      return blocks.switch_block(model, index, x, positions_BT), None

    return jax.lax.scan(one, x_BTD, layers)[0]

  def window(x_BTD):
    def one(x, i):
      return blocks.switch_block(model, start + i, x, positions_BT), None

    return jax.lax.scan(one, x_BTD, jnp.arange(size))[0]

  x_BTD = run_outside(blocks.embed(model, tokens_BT), 0, start)
  x_BTD = damped_loop(window, x_BTD, loops, step, anchor)
  return blocks.head(model, run_outside(x_BTD, start + size, num_layers))


class Looper:
  """Validation perplexity of the model with a window looped, on fixed batches."""

  def __init__(self, model: lm.Decoder, batches: Sequence[dict[str, np.ndarray]], size: int):
    def nll(model, inputs_BT, targets_BT, *args):
      logits_BTV = looped_logits(model, inputs_BT, *args, size=size)
      return blocks.token_nll(logits_BTV, targets_BT).sum()

    self._nll = blocks.jit_method(model, nll)
    self.batches = list(batches)
    self.tokens = sum(b["targets"].size for b in self.batches)

  def perplexity(self, start: int, loops: int, step: float, anchor: float) -> float:
    args = (np.int32(start), np.int32(loops), np.float32(step), np.float32(anchor))
    total = sum(float(self._nll(b["inputs"], b["targets"], *args)) for b in self.batches)
    return float(np.exp(min(total / self.tokens, 50.0)))


def analyze_model(
  model: lm.Decoder,
  batches: Sequence[dict[str, np.ndarray]],
  start: int = -1,
  size: int = 0,
  max_loops: int = 8,
  position_loops: int = 4,
  beta: float = BETA,
) -> dict[str, Any]:
  """Both sweeps; start -1 and size 0 take `default_window`."""
  n = len(model.blocks)
  default_start, default_size = default_window(n)
  size = size or default_size
  start = default_start if start < 0 else start
  if not (0 < size <= n and 0 <= start <= n - size):
    raise ConfigError(f"window --start={start} --size={size} does not fit in {n} layers")
  if max_loops < 1 or position_loops < 1:
    raise ConfigError(f"--max_loops={max_loops} and --position_loops={position_loops} must be >= 1")
  looper = Looper(model, batches, size)
  loops = list(range(1, max_loops + 1))
  starts = list(range(n - size + 1))

  def sweep(points):
    return {
      v: [looper.perplexity(s, *variant_args(v, k, beta)) for s, k in points] for v in VARIANTS
    }

  return dict(
    tokens=looper.tokens,
    widths=[int(w) for w in model.widths],
    residual_widths=[int(d) for d in model.residual_widths],
    window=dict(start=start, size=size, layers=list(range(start, start + size))),
    beta=beta,
    perplexity=looper.perplexity(start, 1, 1.0, 0.0),
    by_loops=dict(loops=loops, **sweep([(start, k) for k in loops])),
    by_position=dict(
      loops=position_loops, starts=starts, **sweep([(s, position_loops) for s in starts])
    ),
  )


def analyze(
  restored: restore.Restored, batches: int, batch_size: int, **kwargs: Any
) -> dict[str, Any]:
  data = load.validation_batches(restored.config, batches, batch_size)
  result = analyze_model(restored.model, data, **kwargs)
  info = dict(workdir=restored.workdir, label=restored.label, step=restored.step)
  return dict(**info, backbone=restored.config.model.backbone, **result)


def plot(result: dict[str, Any]) -> Figure:
  fig = Figure(figsize=(11, 4))
  left, right = fig.subplots(1, 2)
  window = result["window"]["layers"]
  for variant in VARIANTS:
    left.plot(result["by_loops"]["loops"], result["by_loops"][variant], marker="o", label=variant)
    right.plot(
      result["by_position"]["starts"], result["by_position"][variant], marker="o", label=variant
    )
  for ax in (left, right):
    ax.axhline(result["perplexity"], color="k", lw=0.8, ls=":", label="model")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  left.set_xlabel("K (window passes)")
  left.set_title(f"layers {window[0]}-{window[-1]} looped: {result['label']}")
  right.set_xlabel(f"window start ({len(window)} layers)")
  right.set_title(f"K = {result['by_position']['loops']}")
  right.set_xticks(result["by_position"]["starts"])
  fig.tight_layout()
  return fig


def main(argv: Sequence[str]) -> None:
  del argv
  restored = restore.latest(_WORKDIR.value)
  result = analyze(
    restored,
    _BATCHES.value,
    _BATCH_SIZE.value,
    start=_START.value,
    size=_SIZE.value,
    max_loops=_MAX_LOOPS.value,
    position_loops=_POSITION_LOOPS.value,
    beta=_BETA.value,
  )
  print(load.write_json(restored.workdir, "looping", result))
  print(load.save_figure(plot(result), restored.workdir, "looping"))


if __name__ == "__main__":
  from absl import flags

  _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
  _BATCHES = flags.DEFINE_integer("batches", 2, "Validation batches to score.")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per batch (0: train.batch_size).")
  _START = flags.DEFINE_integer("start", -1, "First layer of the window (-1: centred at 52.5%).")
  _SIZE = flags.DEFINE_integer("size", 0, "Layers in the window (0: 4, at most a quarter).")
  _MAX_LOOPS = flags.DEFINE_integer("max_loops", 8, "Sweep K = 1..max_loops.")
  _POSITION_LOOPS = flags.DEFINE_integer("position_loops", 4, "K of the window-position sweep.")
  _BETA = flags.DEFINE_float("beta", BETA, "Anchor weight of g(x_0) in the anchored variant.")
  flags.mark_flag_as_required("workdir")
  cli.run(main)
