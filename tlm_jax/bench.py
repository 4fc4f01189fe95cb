"""Throughput of the real train step for a config and its uniform twin, in one run.

    python -m tlm_jax.bench --config configs/tlm_transformer.py:124m \
        --config.model.attention_impl=cudnn --config.train.batch_size=32 [--steps 20]

Prints one JSON object: per model, compile seconds, median step ms, tokens/s,
MFU and peak device memory (per program, from XLA), plus tapered / uniform
ratios. Batches are random tokens (the data pipeline is not what is measured).

    python -m tlm_jax.bench --config C --loop [--steps 150]   # loop_over_step_tokens_per_sec
    python -m tlm_jax.bench --config C --compile_only         # compile_s, compile_ratio
    python -m tlm_jax.bench --config C --data [--hosts 1,2,4]  # host tokens/s per process
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from tlm_jax import cli, metrics, sharding, state, taper, workdir
from tlm_jax.data import pipeline, pretokenize


def measure(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  """Compile and time `steps` train steps after one warm-up step."""
  setup = state.setup(config, sharding.make_mesh(config.mesh))
  tcfg = config.train
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (tcfg.batch_size, tcfg.seq_len), np.int32)
  batch = sharding.to_global(dict(inputs=tokens, targets=tokens), setup.batch_sharding)

  start = time.perf_counter()
  compiled = setup.train_step.lower(setup.abstract_state, batch).compile()
  compile_s = time.perf_counter() - start
  train_state = setup.init_fn()
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
  flops = setup.flops_per_token
  memory = compiled.memory_analysis()
  return dict(
    schedule=config.model.taper.schedule,
    widths=list(setup.widths),
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
    mfu_convention=metrics.MFU_CONVENTION,
  )


def compile_only(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Train-step compile seconds of the config against its uniform twin run as one scan
  (grouped layers of one width): what depth costs at compile time."""
  twin = taper.uniform_twin(config)
  twin.model.layers_mode = "grouped"
  times = {}
  for name, cfg in (("config", config), ("uniform_scan", twin)):
    setup = state.setup(cfg, sharding.make_mesh(cfg.mesh))
    tokens = jax.ShapeDtypeStruct(
      (cfg.train.batch_size, cfg.train.seq_len), np.int32, sharding=setup.batch_sharding
    )
    start = time.perf_counter()
    setup.train_step.lower(setup.abstract_state, dict(inputs=tokens, targets=tokens)).compile()
    times[name] = time.perf_counter() - start
  return dict(
    device=jax.devices()[0].device_kind,
    num_layers=config.model.num_layers,
    layers_mode=config.model.layers_mode,
    schedule=config.model.taper.schedule,
    compile_s=times["config"],
    uniform_scan_compile_s=times["uniform_scan"],
    compile_ratio=times["config"] / times["uniform_scan"],
  )


def loop(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  """The real train loop (data pipeline, prefetch, logging; `python -m tlm_jax.train` in a
  subprocess) against the bare compiled step on the same config, in one run.

  Loop tokens/s is the median of the loop's own logged windows, without the first (it
  holds the compile) and the last (evaluation and the final checkpoint).
  """
  config = config.copy_and_resolve_references()
  log_every = max(1, steps // 10)
  config.train.update(steps=steps, log_every=log_every, eval_every=steps, checkpoint_every=steps)
  config.train.warmup_steps = min(config.train.warmup_steps, steps - 1)
  with tempfile.TemporaryDirectory() as tmp:
    workdir.write_config(tmp, config)
    config_json, run_dir = workdir.path(tmp, workdir.CONFIG), os.path.join(tmp, "run")
    cmd = [sys.executable, "-m", "tlm_jax.train", "--workdir", run_dir, "--config", config_json]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
      raise RuntimeError(f"the train loop failed:\n{result.stderr[-3000:]}")
    rows = workdir.training_rows(run_dir)
  loop_rate = statistics.median(r["tokens_per_sec"] for r in rows[1:-1])
  step_rate = measure(config, steps)["tokens_per_sec"]
  return dict(
    device=jax.devices()[0].device_kind,
    steps=steps,
    batch_size=config.train.batch_size,
    seq_len=config.train.seq_len,
    loop_tokens_per_sec=loop_rate,
    step_tokens_per_sec=step_rate,
    loop_over_step_tokens_per_sec=loop_rate / step_rate,
  )


def data_rate(config: ml_collections.ConfigDict, process_count: int, batches: int) -> float:
  """Tokens/s one of `process_count` simulated hosts gets from the train pipeline (its rows
  of each global batch): the median of five windows of `batches` batches after a warm-up
  window (Grain reads ahead on threads, so a short window can time its buffer)."""
  it = pipeline.make_iterator(config, "train", process_count=process_count)
  rates = []
  for _ in range(6):
    start = time.perf_counter()
    for _ in range(batches):
      rows = next(it)["inputs"]
    rates.append(batches * rows.size / (time.perf_counter() - start))
  return statistics.median(rates[1:])


def data(config: ml_collections.ConfigDict, hosts: Sequence[int], batches: int) -> dict[str, Any]:
  """Per-host data throughput at each host count: streaming (every host tokenizes the whole
  global batch) and, where `python -m tlm_jax.data.pretokenize` has built the config's
  cache, pretokenized (each host reads its rows)."""
  rates = {}
  for pretokenized in (False, True):
    cfg = config.copy_and_resolve_references()
    cfg.data.pretokenized = pretokenized
    built = os.path.exists(os.path.join(pretokenize.cache_dir(cfg), "train.json"))
    if built or not pretokenized:
      mode = "pretokenized" if pretokenized else "streamed"
      rates[mode] = {str(p): data_rate(cfg, p, batches) for p in hosts}
  return dict(
    tokenizer=config.data.tokenizer,
    batch_size=config.train.batch_size,
    seq_len=config.train.seq_len,
    worker_count=config.data.worker_count,
    tokens_per_sec_per_host=rates,
  )


def main(argv: Sequence[str]) -> None:
  del argv
  if _LOOP.value:
    result = loop(_CONFIG.value, _STEPS.value)
  elif _DATA.value:
    result = data(_CONFIG.value, [int(h) for h in _HOSTS.value], _STEPS.value)
  elif _COMPILE_ONLY.value:
    result = compile_only(_CONFIG.value)
  else:
    result = run(_CONFIG.value, _STEPS.value)
  print(json.dumps(result))


if __name__ == "__main__":
  from absl import flags

  _CONFIG = cli.config_flag()
  _STEPS = flags.DEFINE_integer(
    "steps", 20, "Timed steps per model (after one warm-up).", lower_bound=1
  )
  _LOOP = flags.DEFINE_bool("loop", False, "The real train loop against the bare step.")
  _COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile seconds against the uniform twin as one scan."
  )
  _DATA = flags.DEFINE_bool("data", False, "Host tokens/s of the data pipeline per process.")
  _HOSTS = flags.DEFINE_list("hosts", ["1", "2", "4"], "--data: simulated host counts.")
  flags.register_validator(
    "hosts",
    lambda hosts: all(h.isdigit() and int(h) for h in hosts),
    "should be positive integers, e.g. 1,2,4",
  )
  cli.run(main)
