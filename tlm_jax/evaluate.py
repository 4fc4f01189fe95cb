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
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tlm_jax import sharding
from tlm_jax.data import pipeline


def make_eval_step(graphdef, bytes_per_token: np.ndarray):
  """jit: summed loss (nats), target tokens, target bytes and token counts of one batch."""
  bytes_table = jnp.asarray(bytes_per_token, jnp.float32)
  vocab = bytes_table.shape[0]

  @jax.jit
  def step(params, batch):
    logits = nnx.merge(graphdef, params)(batch["inputs"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return dict(loss_sum=loss.sum(), tokens=jnp.asarray(loss.size, jnp.float32),
                bytes=bytes_table[batch["targets"]].sum(),
                counts=jnp.zeros(vocab, jnp.float32).at[batch["targets"]].add(1.0))

  return step


def evaluate(config: Any, eval_step, params: Any, batch_sh, split: str) -> dict[str, float]:
  """Mean over the first config.train.eval_batches batches of `split` (the same every call).

  The split repeats if it is shorter, so every process takes the same number
  of batches and small validation sets still fill them.
  """
  data_iter = pipeline.make_iterator(
      config, split, process_index=jax.process_index(), process_count=jax.process_count())
  totals = dict(loss_sum=0.0, tokens=0.0, bytes=0.0, counts=0.0)
  for local in itertools.islice(data_iter, config.train.eval_batches):
    out = jax.device_get(eval_step(params, sharding.to_global(local, batch_sh)))
    totals = {k: totals[k] + np.asarray(out[k], np.float64) for k in totals}
  loss = float(totals["loss_sum"] / totals["tokens"])
  p = totals["counts"][totals["counts"] > 0] / totals["tokens"]
  unigram_bits = float(-(p * np.log2(p)).sum() * totals["tokens"] / totals["bytes"])
  return dict(loss=loss, perplexity=math.exp(min(loss, 50.0)),
              bits_per_byte=float(totals["loss_sum"] / math.log(2) / totals["bytes"]),
              unigram_bits_per_byte=unigram_bits, tokens=int(totals["tokens"]))


def evaluate_workdir(workdir: str, split: str | None = None) -> dict[str, Any]:
  """Restore the latest checkpoint of a training workdir and evaluate it."""
  import ml_collections

  from tlm_jax import checkpoint, optim, train
  from tlm_jax.data import tokenizers
  from tlm_jax.errors import ConfigError

  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"{path} not found: --workdir must be a folder written by tlm_jax.train")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  mesh = sharding.make_mesh(config.mesh)
  graphdef, _, _, abstract = train.init_state(config, mesh, optim.make_optimizer(config.train))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.train.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    raise ConfigError(f"no checkpoint in {workdir}/checkpoints: train first")
  split = split or config.data.eval_split
  state = ckpt.restore(step, abstract)
  ckpt.close()
  eval_step = make_eval_step(graphdef, tokenizers.make_tokenizer(config.data).bytes_per_token)
  row = evaluate(config, eval_step, state["params"], sharding.batch_sharding(mesh), split)
  row = dict(step=step, split=split, **row)
  with open(os.path.join(workdir, f"eval_{split}_{step}.json"), "w") as f:
    json.dump(row, f)
  return row


def main(argv: Sequence[str]) -> None:
  del argv
  print(json.dumps(evaluate_workdir(_WORKDIR.value, _SPLIT.value)))


if __name__ == "__main__":
  from absl import app, flags

  _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
  _SPLIT = flags.DEFINE_string("split", None, "Split to evaluate (default: data.eval_split).")
  flags.mark_flag_as_required("workdir")
  app.run(main)
