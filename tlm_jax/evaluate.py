"""Validation loss, perplexity and bits per byte, zero-shot tasks and passkey retrieval;
CLI over a workdir's latest checkpoint.

    python -m tlm_jax.evaluate --workdir DIR [--split validation]
    python -m tlm_jax.evaluate --workdir DIR --tasks piqa,hellaswag,...,wikitext,niah --data_dir D

Tasks (formats and scoring in tlm_jax/tasks.py) read D/TASK.jsonl and write
`tasks_STEP.json` ({TASK: {n, acc, acc_norm, acc_stderr, ...}}, merged with an
earlier file of the same step), one `metrics.jsonl` row per task with
`"split": "task:NAME"`, and for niah a heatmap `niah_STEP.png`.

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes the target
tokens stand for, so byte-level and SentencePiece runs compare. The same
tokens' unigram entropy (`unigram_bits_per_byte`: the best a model blind to
context could do) is reported beside it as a floor to beat.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from tlm_jax import cli, metrics, restore, sharding, tasks
from tlm_jax import workdir as workdir_lib
from tlm_jax.data import pipeline
from tlm_jax.errors import ConfigError


def make_eval_step(graphdef: nnx.GraphDef, bytes_per_token: np.ndarray) -> Callable:
  """jit: summed loss (nats), target tokens, target bytes and token counts of one batch."""
  bytes_table = jnp.asarray(bytes_per_token, jnp.float32)
  vocab = bytes_table.shape[0]

  @jax.jit
  def step(params, batch):
    logits_BTV = nnx.merge(graphdef, params)(batch["inputs"])
    loss_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    return dict(
      loss_sum=loss_BT.sum(),
      tokens=jnp.asarray(loss_BT.size, jnp.float32),
      bytes=bytes_table[batch["targets"]].sum(),
      counts=jnp.zeros(vocab, jnp.float32).at[batch["targets"]].add(1.0),
    )

  return step


def evaluate(
  config: ml_collections.ConfigDict,
  eval_step: Callable,
  params: Any,
  batch_sh: NamedSharding,
  split: str,
) -> dict[str, float]:
  """Mean over the first config.train.eval_batches batches of `split` (the same every call).

  The split repeats if it is shorter, so every process takes the same number
  of batches and small validation sets still fill them.
  """
  data_iter = pipeline.make_iterator(
    config, split, process_index=jax.process_index(), process_count=jax.process_count()
  )
  totals = dict(loss_sum=0.0, tokens=0.0, bytes=0.0, counts=0.0)
  for local in itertools.islice(data_iter, config.train.eval_batches):
    out = jax.device_get(eval_step(params, sharding.to_global(local, batch_sh)))
    totals = {k: totals[k] + np.asarray(out[k], np.float64) for k in totals}
  loss = float(totals["loss_sum"] / totals["tokens"])
  p = totals["counts"][totals["counts"] > 0] / totals["tokens"]
  unigram_bits = float(-(p * np.log2(p)).sum() * totals["tokens"] / totals["bytes"])
  return dict(
    loss=loss,
    perplexity=math.exp(min(loss, 50.0)),
    bits_per_byte=float(totals["loss_sum"] / math.log(2) / totals["bytes"]),
    unigram_bits_per_byte=unigram_bits,
    tokens=int(totals["tokens"]),
  )


def evaluate_workdir(workdir: str, split: str | None = None) -> dict[str, Any]:
  """Restore the latest checkpoint of a training workdir and evaluate it (also written to
  eval_SPLIT_STEP.json)."""
  restored = restore.latest(workdir)
  split = split or restored.config.data.eval_split
  eval_step = make_eval_step(restored.graphdef, restored.tokenizer.bytes_per_token)
  row = evaluate(restored.config, eval_step, restored.params, restored.batch_sharding, split)
  row = dict(step=restored.step, split=split, **row)
  if jax.process_index() == 0:
    workdir_lib.write_evaluation(workdir, row)
  return row


def evaluate_tasks(
  workdir: str,
  names: str,
  data_dir: str | None,
  *,
  batch_size: int = 16,
  limit: int = 0,
  stride: int = 0,
  niah_lengths: Sequence[int] = (),
  niah_depths: Sequence[float] = tasks.NIAH_DEPTHS,
  niah_trials: int = 4,
  seed: int = 0,
) -> dict[str, dict[str, Any]]:
  """Zero-shot tasks on a workdir's latest checkpoint: {TASK: metrics}, also written to
  tasks_STEP.json, metrics.jsonl (split "task:NAME") and, for niah, niah_STEP.png."""
  names = tasks.parse_tasks(names, data_dir)  # task files are checked before any restore
  restored = restore.latest(workdir)
  seq_len = restored.config.train.seq_len
  scorer = tasks.Scorer(restored.model, seq_len, batch_size)
  grid = tasks.Niah(
    tuple(niah_lengths) or tasks.default_niah_lengths(seq_len),
    tuple(niah_depths),
    niah_trials,
    seed,
  )
  if "niah" in names and max(grid.lengths) > seq_len:
    raise ConfigError(f"--niah_lengths {grid.lengths} go past train.seq_len={seq_len}")
  results = {}
  for name in names:
    kwargs = dict(limit=limit, stride=stride, grid=grid)
    results[name] = tasks.run(scorer, restored.tokenizer, name, data_dir or "", **kwargs)
  if jax.process_index() == 0:
    write_task_results(workdir, restored.step, results)
  return results


def write_task_results(workdir: str, step: int, results: dict[str, dict[str, Any]]) -> None:
  workdir_lib.write_tasks(workdir, step, results)
  writer = metrics.MetricsWriter(workdir)
  try:
    for name, result in results.items():
      scalars = {k: v for k, v in result.items() if isinstance(v, (int, float))}
      writer.write(dict(step=step, split=f"task:{name}", **scalars))
  finally:
    writer.close()
  if "niah" in results:
    png = workdir_lib.niah_path(workdir, step)
    tasks.niah_heatmap(results["niah"], png, f"passkey retrieval, {workdir} step {step}")


def main(argv: Sequence[str]) -> None:
  del argv
  if _TASKS.value:
    results = evaluate_tasks(
      _WORKDIR.value,
      _TASKS.value,
      _DATA_DIR.value,
      batch_size=_BATCH_SIZE.value,
      limit=_LIMIT.value,
      stride=_STRIDE.value,
      niah_lengths=[int(x) for x in _NIAH_LENGTHS.value],
      niah_depths=[float(x) for x in _NIAH_DEPTHS.value],
      niah_trials=_NIAH_TRIALS.value,
      seed=_SEED.value,
    )
    print(json.dumps(results))
    return
  print(json.dumps(evaluate_workdir(_WORKDIR.value, _SPLIT.value)))


if __name__ == "__main__":
  from absl import flags

  _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
  _SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: data.eval_split).")
  _TASKS = flags.DEFINE_string(
    "tasks", None, f"Comma-separated zero-shot tasks instead of a split: {', '.join(tasks.TASKS)}."
  )
  _DATA_DIR = flags.DEFINE_string("data_dir", None, "Folder of TASK.jsonl files (--tasks).")
  _BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 16, "Sequences per scoring batch.", lower_bound=1
  )
  _LIMIT = flags.DEFINE_integer(
    "limit", 0, "Score only the first N records per task (0: all).", lower_bound=0
  )
  _STRIDE = flags.DEFINE_integer(
    "stride",
    0,
    "wikitext: tokens between rolling windows (0: seq_len, disjoint windows).",
    lower_bound=0,
  )
  _NIAH_LENGTHS = flags.DEFINE_list(
    "niah_lengths", [], "niah: prompt lengths in tokens (default: seq_len/4, seq_len/2, seq_len)."
  )
  _NIAH_DEPTHS = flags.DEFINE_list(
    "niah_depths", [f"{d:g}" for d in tasks.NIAH_DEPTHS], "niah: passkey depths in [0, 1]."
  )
  _NIAH_TRIALS = flags.DEFINE_integer(
    "niah_trials", 4, "niah: random passkeys per cell.", lower_bound=1
  )
  _SEED = flags.DEFINE_integer("seed", 0, "niah: seed of the passkeys.")
  flags.mark_flag_as_required("workdir")
  cli.run(main)
