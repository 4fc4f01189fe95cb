"""Validation loss, perplexity and bits per byte; CLI over a workdir's latest checkpoint.

    python -m tlm_jax.evaluate --workdir DIR [--split validation]

Bits per byte divides the summed loss (in bits) by the UTF-8 bytes the target
tokens stand for, so byte-level and SentencePiece runs compare. The same
tokens' unigram entropy (`unigram_bits_per_byte`: the best a model blind to
context could do) is reported beside it as a floor to beat.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding

from tlm_jax import checkpoint, cli, sharding, state
from tlm_jax import config as config_lib
from tlm_jax.data import pipeline, tokenizers
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
  """Restore the latest checkpoint of a training workdir and evaluate it."""
  config = config_lib.from_json(os.path.join(workdir, "config.json"))
  mesh = sharding.make_mesh(config.mesh)
  run = state.setup(config, mesh)
  ckpt = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints
  )
  try:
    step, restored = ckpt.restore_latest(run.abstract_state)
  finally:
    ckpt.close()
  if step is None:
    raise ConfigError(f"no checkpoint in {workdir}/checkpoints: train first")
  split = split or config.data.eval_split
  eval_step = make_eval_step(run.graphdef, tokenizers.make_tokenizer(config.data).bytes_per_token)
  row = evaluate(config, eval_step, restored["params"], run.batch_sharding, split)
  row = dict(step=step, split=split, **row)
  with open(os.path.join(workdir, f"eval_{split}_{step}.json"), "w") as f:
    json.dump(row, f)
  return row


def main(argv: Sequence[str]) -> None:
  del argv
  print(json.dumps(evaluate_workdir(_WORKDIR.value, _SPLIT.value)))


if __name__ == "__main__":
  from absl import flags

  _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
  _SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: data.eval_split).")
  flags.mark_flag_as_required("workdir")
  cli.run(main)
