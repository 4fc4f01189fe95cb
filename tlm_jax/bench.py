"""Throughput of the real train step for a config and its uniform twin, in one run.

    python -m tlm_jax.bench --config configs/tlm_transformer.py:124m \
        --config.model.attention_impl=cudnn --config.train.batch_size=32 [--steps 20]

Prints one JSON object: per model, compile seconds, median step ms, tokens/s,
MFU and peak device memory (per program, from XLA), plus tapered / uniform
ratios. Batches are random tokens (the data pipeline is not what is measured).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from tlm_jax import cli, metrics, sharding, state, taper


def measure(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  """Compile and time `steps` train steps after one warm-up step."""
  run = state.setup(config, sharding.make_mesh(config.mesh))
  tcfg = config.train
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (tcfg.batch_size, tcfg.seq_len), np.int32)
  batch = sharding.to_global(dict(inputs=tokens, targets=tokens), run.batch_sharding)

  start = time.perf_counter()
  compiled = run.train_step.lower(run.abstract_state, batch).compile()
  compile_s = time.perf_counter() - start
  train_state = run.init_fn()
  train_state, out = compiled(train_state, batch)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    train_state, out = compiled(train_state, batch)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  tokens_per_sec = tcfg.batch_size * tcfg.seq_len / step_s
  flops = run.flops_per_token
  memory = compiled.memory_analysis()
  return dict(
    schedule=config.model.taper.schedule,
    widths=list(run.widths),
    compile_s=compile_s,
    median_step_ms=1e3 * step_s,
    tokens_per_sec=tokens_per_sec,
    mfu=metrics.mfu(
      flops, tokens_per_sec, jax.device_count(), tcfg.peak_flops or metrics.peak_flops_per_device()
    ),
    flops_per_token=flops,
    # Per device, from the compiled program (a live allocator peak would mix both runs).
    peak_memory_gib=memory.peak_memory_in_bytes / 2**30,
    final_loss=float(out["loss"]),
  )


def run(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  tapered = measure(config, steps)
  uniform = measure(taper.uniform_twin(config), steps)
  return dict(
    device=jax.devices()[0].device_kind,
    devices=jax.device_count(),
    batch_size=config.train.batch_size,
    seq_len=config.train.seq_len,
    dtype=config.model.dtype,
    layers_mode=config.model.layers_mode,
    tapered=tapered,
    uniform=uniform,
    tapered_over_uniform_tokens_per_sec=tapered["tokens_per_sec"] / uniform["tokens_per_sec"],
  )


def main(argv: Sequence[str]) -> None:
  del argv
  print(json.dumps(run(_CONFIG.value, _STEPS.value)))


if __name__ == "__main__":
  from absl import flags

  _CONFIG = cli.config_flag()
  _STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per model (after one warm-up).")
  cli.run(main)
