"""Layer redundancy by swapping layers: replacement and interchange distances, KL-guided pruning.

    python -m tlm_jax.analysis.swap_kl --workdir W [--batches 2 --max_remove 2]

On a fixed prompt set (the first validation windows), with p the model's
next-token distributions and KL averaged over every position:

    replacement  d_repl(i, j) = max(KL(p || p_{i<-j}), KL(p || p_{j<-i}))
                 (slot i runs layer j's weights, and the other way round)
    interchange  d_int(i, j)  = KL(p || p_{i<->j})   (slots i and j trade layers)

Pairs under 0.05 are strongly swap-similar. Tapered layers have different MLP
widths, so "layer j's weights" cannot be copied into slot i's arrays. Both
readings are computed, as `mode`:

    block  the whole block moves (mixer, MLP and both norms): slot i then has
           layer j's MLP width, so the stack's widths are permuted (or, for
           replacement, one width is duplicated and one dropped);
    mixer  only the mixer and its norm move; every slot keeps its own MLP, so
           the widths stay where the taper put them.

In a uniform model both modes are defined without any choice; in a tapered
one `block` asks "is layer j a stand-in for layer i", `mixer` asks the same
of the token mixers alone. Nothing is copied: a plan runs slot i with layer
j's sublayer (blocks.run_plan), so widths never need to match. In an X-shaped
model a sublayer also keeps its layer's residual width d_j, resized to and from
the stream as the decoder resizes between blocks: in `block` mode slot i runs
layer j at d_j, in `mixer` mode layer j's mixer at d_j, then slot i's MLP at
d_i; the embedding and head stay where they are.

KL-guided pruning: take the pairs in order of increasing distance; while the
budget lasts, remove the later layer of a pair whose two layers are both
still present (the earlier one stays as its stand-in). Validation perplexity
on the same windows at each removal budget, for each protocol and mode,
beside random removal (mean over --random_trials draws).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure

from tlm_jax import cli, restore
from tlm_jax.analysis import blocks, load
from tlm_jax.errors import ConfigError
from tlm_jax.model import lm

MODES = ("block", "mixer")
PROTOCOLS = ("replacement", "interchange")
SIMILAR = 0.05  # below this KL a pair is strongly swap-similar (arXiv 2605.16234)

Plan = tuple[np.ndarray, np.ndarray]


def identity(num_layers: int) -> Plan:
  order = np.arange(num_layers, dtype=np.int32)
  return order, order.copy()


def replaced(num_layers: int, i: int, j: int, mode: str) -> Plan:
  """Slot i runs layer j (whole block, or only its mixer)."""
  mixers, mlps = identity(num_layers)
  mixers[i] = j
  if mode == "block":
    mlps[i] = j
  return mixers, mlps


def interchanged(num_layers: int, i: int, j: int, mode: str) -> Plan:
  """Slots i and j trade layers (whole blocks, or only mixers)."""
  mixers, mlps = identity(num_layers)
  mixers[[i, j]] = j, i
  if mode == "block":
    mlps[[i, j]] = j, i
  return mixers, mlps


def removed(num_layers: int, layers: Sequence[int]) -> Plan:
  """The stack without `layers` (their slots add nothing)."""
  mixers, mlps = identity(num_layers)
  mixers[list(layers)] = mlps[list(layers)] = num_layers
  return mixers, mlps


class Scorer:
  """KL(p || p_plan) and perplexity of any plan on fixed batches, one compiled program.

  The reference distributions p come from the same program run on the
  identity plan, so a plan equal to the model scores exactly 0.
  """

  def __init__(self, model: lm.Decoder, batches: Sequence[dict[str, np.ndarray]]):
    self.num_layers = len(model.blocks)

    def score(model, inputs_BT, targets_BT, base_BTV, mixers_P, mlps_P):
      logits_BTV = blocks.plan_logits(model, inputs_BT, mixers_P, mlps_P)
      logq_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
      kl_BT = jnp.sum(jnp.exp(base_BTV) * (base_BTV - logq_BTV), axis=-1)
      return kl_BT.sum(), blocks.token_nll(logits_BTV, targets_BT).sum(), logq_BTV

    self._score = blocks.jit_method(model, score)
    self.batches = list(batches)
    self.tokens = sum(b["targets"].size for b in self.batches)
    self.base = []
    plan = identity(self.num_layers)
    for b in self.batches:
      zeros = jnp.zeros((*b["inputs"].shape, model.embed.shape[0]), jnp.float32)
      self.base.append(self._score(b["inputs"], b["targets"], zeros, *plan)[2])

  def __call__(self, plan: Plan) -> tuple[float, float]:
    """(mean KL per token from the model, perplexity) of a plan."""
    kl = nll = 0.0
    for b, base in zip(self.batches, self.base):
      kl_sum, nll_sum, _ = self._score(b["inputs"], b["targets"], base, *plan)
      kl, nll = kl + float(kl_sum), nll + float(nll_sum)
    return kl / self.tokens, float(np.exp(min(nll / self.tokens, 50.0)))

  def kl(self, plan: Plan) -> float:
    return self(plan)[0]

  def perplexity(self, plan: Plan) -> float:
    return self(plan)[1]


def distances(scorer: Scorer, mode: str) -> dict[str, np.ndarray]:
  """L x L replacement and interchange distances (symmetric, zero diagonal)."""
  n = scorer.num_layers
  repl, inter = np.zeros((n, n)), np.zeros((n, n))
  for i, j in itertools.combinations(range(n), 2):
    ij, ji = scorer.kl(replaced(n, i, j, mode)), scorer.kl(replaced(n, j, i, mode))
    repl[i, j] = repl[j, i] = max(ij, ji)
    inter[i, j] = inter[j, i] = scorer.kl(interchanged(n, i, j, mode))
  return dict(replacement=repl, interchange=inter)


def similar_pairs(matrix: np.ndarray, threshold: float = SIMILAR) -> list[list]:
  """[i, j, d] for i < j with d < threshold, most similar first."""
  pairs = [[i, j, float(matrix[i, j])] for i, j in itertools.combinations(range(len(matrix)), 2)]
  return sorted((p for p in pairs if p[2] < threshold), key=lambda p: p[2])


def pruning_order(matrix: np.ndarray, budget: int) -> list[int]:
  """Layers to remove, in order: the later layer of the closest pair whose two layers remain."""
  pairs = sorted(itertools.combinations(range(len(matrix)), 2), key=lambda p: matrix[p])
  gone: list[int] = []
  for i, j in pairs:
    if len(gone) == budget:
      break
    if i not in gone and j not in gone:
      gone.append(j)
  return gone


def analyze_model(
  model: lm.Decoder,
  batches: Sequence[dict[str, np.ndarray]],
  max_remove: int = 0,
  random_trials: int = 5,
  seed: int = 0,
) -> dict[str, Any]:
  """Distances in both modes, similar pairs, and pruning curves; max_remove 0 means L // 2."""
  scorer = Scorer(model, batches)
  n = scorer.num_layers
  max_remove = max_remove or max(1, n // 2)
  if not 0 < max_remove < n:
    raise ConfigError(f"--max_remove={max_remove} must lie in [1, {n - 1}] for {n} layers")
  budgets = list(range(max_remove + 1))
  modes: dict[str, Any] = {}
  guided: dict[str, Any] = {}
  for mode in MODES:
    matrices = distances(scorer, mode)
    modes[mode] = {p: matrices[p].tolist() for p in PROTOCOLS}
    modes[mode]["similar_pairs"] = {p: similar_pairs(matrices[p]) for p in PROTOCOLS}
    guided[mode] = {}
    for protocol in PROTOCOLS:
      order = pruning_order(matrices[protocol], max_remove)
      guided[mode][protocol] = dict(
        removed=order,
        perplexity=[scorer.perplexity(removed(n, order[:b])) for b in budgets],
      )
  rng = np.random.default_rng(seed)
  draws = [
    [scorer.perplexity(removed(n, rng.choice(n, b, replace=False))) for _ in range(random_trials)]
    for b in budgets
  ]
  return dict(
    tokens=scorer.tokens,
    widths=[int(w) for w in model.widths],
    residual_widths=[int(d) for d in model.residual_widths],
    threshold=SIMILAR,
    perplexity=scorer.perplexity(identity(n)),
    modes=modes,
    pruning=dict(
      budgets=budgets,
      kl_guided=guided,
      random=dict(
        trials=random_trials,
        perplexity=[float(np.mean(d)) for d in draws],
        perplexity_std=[float(np.std(d)) for d in draws],
      ),
    ),
  )


def analyze(
  restored: restore.Restored,
  batches: int,
  batch_size: int,
  max_remove: int,
  random_trials: int,
  seed: int,
) -> dict[str, Any]:
  data = load.validation_batches(restored.config, batches, batch_size)
  result = analyze_model(restored.model, data, max_remove, random_trials, seed)
  info = dict(workdir=restored.workdir, label=restored.label, step=restored.step)
  return dict(**info, backbone=restored.config.model.backbone, **result)


def plot(result: dict[str, Any]) -> Figure:
  """Heatmaps (rows: modes, columns: protocols) and the pruning curves."""
  fig = Figure(figsize=(14, 8))
  grid = fig.add_gridspec(2, 3)
  n = len(result["widths"])
  for r, mode in enumerate(MODES):
    for c, protocol in enumerate(PROTOCOLS):
      ax = fig.add_subplot(grid[r, c])
      matrix = np.array(result["modes"][mode][protocol])
      image = ax.imshow(matrix, cmap="viridis")
      fig.colorbar(image, ax=ax, fraction=0.046)
      ax.set_title(f"{protocol} KL, {mode} mode")
      ax.set_xticks(range(n))
      ax.set_yticks(range(n))
      ax.set_xlabel("layer j")
      ax.set_ylabel("layer i")
      if n <= 12:
        for i, j in itertools.product(range(n), range(n)):
          mark = "*" if i != j and matrix[i, j] < result["threshold"] else ""
          ax.text(j, i, f"{matrix[i, j]:.2g}{mark}", ha="center", va="center", fontsize=7)
  ax = fig.add_subplot(grid[:, 2])
  budgets = result["pruning"]["budgets"]
  for mode, by_protocol in result["pruning"]["kl_guided"].items():
    for protocol, curve in by_protocol.items():
      style = "-" if mode == "block" else "--"
      ax.plot(budgets, curve["perplexity"], style, marker="o", label=f"{protocol} ({mode})")
  rand = result["pruning"]["random"]
  ax.errorbar(budgets, rand["perplexity"], rand["perplexity_std"], color="k", label="random")
  ax.set_xticks(budgets)
  ax.set_xlabel("layers removed")
  ax.set_ylabel("validation perplexity")
  ax.set_title(f"KL-guided pruning: {result['label']}")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def main(argv: Sequence[str]) -> None:
  del argv
  restored = restore.latest(_WORKDIR.value)
  result = analyze(
    restored,
    _BATCHES.value,
    _BATCH_SIZE.value,
    _MAX_REMOVE.value,
    _RANDOM_TRIALS.value,
    _SEED.value,
  )
  print(load.write_json(restored.workdir, "swap_kl", result))
  print(load.save_figure(plot(result), restored.workdir, "swap_kl"))


if __name__ == "__main__":
  from absl import flags

  _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
  _BATCHES = flags.DEFINE_integer("batches", 2, "Validation batches forming the prompt set.")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per batch (0: train.batch_size).")
  _MAX_REMOVE = flags.DEFINE_integer(
    "max_remove", 0, "Largest pruning budget (0: half the layers)."
  )
  _RANDOM_TRIALS = flags.DEFINE_integer(
    "random_trials", 5, "Random removals per budget.", lower_bound=1
  )
  _SEED = flags.DEFINE_integer("seed", 0, "Seed of the random-removal baseline.")
  flags.mark_flag_as_required("workdir")
  cli.run(main)
