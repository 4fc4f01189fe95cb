"""Throughput of the real train step for a config and its uniform twin, in one run.

    python -m tlm_jax.bench --config configs/tlm_transformer.py:124m \
        --config.model.attention_impl=cudnn --config.train.batch_size=32 [--steps 20]

Prints one JSON object: per model, compile seconds, median step ms, tokens/s,
MFU and peak device memory (per program, from XLA), plus tapered / uniform
ratios. Batches are random tokens (the data pipeline is not what is measured).

    python -m tlm_jax.bench --config C --loop [--steps 150]   # loop_over_step_tokens_per_sec
    python -m tlm_jax.bench --config C --compile_only         # compile_s, init_compile_s
    python -m tlm_jax.bench --config C --data [--hosts 1,2,4]  # host tokens/s per process
    python -m tlm_jax.bench --config C --decode [--prompt_len 512 --new_tokens 64 --steps 5]
    python -m tlm_jax.bench --config C --profile DIR [--steps 3]  # a trace of bare steps
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from tlm_jax import cli, generate, metrics, sharding, state, taper, workdir
from tlm_jax.data import pipeline, pretokenize


def _warm(config: ml_collections.ConfigDict) -> tuple[state.Setup, Any, float, Any, Any]:
  """The config's setup, its compiled train step and compile seconds, and the state after
  one warm-up step on a batch of random tokens (the batch too)."""
  setup = state.setup(config, sharding.make_mesh(config.mesh))
  tcfg = config.train
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (tcfg.batch_size, tcfg.seq_len), np.int32)
  batch = sharding.to_global(dict(inputs=tokens, targets=tokens), setup.batch_sharding)

  start = time.perf_counter()
  compiled = setup.train_step.lower(setup.abstract_state, batch).compile()
  compile_s = time.perf_counter() - start
  train_state, out = compiled(setup.init_fn(), batch)
  jax.block_until_ready(out)
  return setup, compiled, compile_s, train_state, batch


def measure(config: ml_collections.ConfigDict, steps: int) -> dict[str, Any]:
  """Compile and time `steps` train steps after one warm-up step."""
  setup, compiled, compile_s, train_state, batch = _warm(config)
  tcfg = config.train
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


_COMPILE_EVENTS = (
  "/jax/core/compile/jaxpr_trace_duration",
  "/jax/core/compile/jaxpr_to_mlir_module_duration",
  "/jax/core/compile/backend_compile_duration",
)


def compile_seconds(fn: Callable[[], Any]) -> tuple[Any, float]:
  """fn()'s result and the seconds JAX spent tracing, lowering and compiling inside it (its
  own run time excluded)."""
  spent = []

  def listen(event: str, seconds: float, **kwargs: Any) -> None:
    if event in _COMPILE_EVENTS:
      spent.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    result = jax.block_until_ready(fn())
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  return result, sum(spent)


def compile_only(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Train-step compile seconds of the config against its uniform twin run as one scan
  (grouped layers of one width): what depth costs at compile time; and the seconds the
  config's init (setup.init_fn, run once) spends compiling."""
  twin = taper.uniform_twin(config)
  twin.model.layers_mode = "grouped"
  times = {}
  for name, cfg in (("config", config), ("uniform_scan", twin)):
    setup = state.setup(cfg, sharding.make_mesh(cfg.mesh))
    if name == "config":
      _, init_s = compile_seconds(setup.init_fn)
    tokens = jax.ShapeDtypeStruct(
      (cfg.train.batch_size, cfg.train.seq_len), np.int32, sharding=setup.batch_sharding
    )
    start = time.perf_counter()
    setup.train_step.lower(setup.abstract_state, dict(inputs=tokens, targets=tokens)).compile()
    times[name] = time.perf_counter() - start
  return dict(
    device=jax.devices()[0].device_kind,
    backbone=config.model.backbone,
    num_layers=config.model.num_layers,
    layers_mode=config.model.layers_mode,
    schedule=config.model.taper.schedule,
    compile_s=times["config"],
    init_compile_s=init_s,
    init_over_step_compile=init_s / times["config"],
    uniform_scan_compile_s=times["uniform_scan"],
    compile_ratio=times["config"] / times["uniform_scan"],
  )


def _median_seconds(fn: Callable[[], Any], runs: int) -> float:
  """Median wall seconds of fn() (waited for) over `runs` runs after one warm-up run."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def decode(
  config: ml_collections.ConfigDict, prompt_len: int, new_tokens: int, runs: int
) -> dict[str, Any]:
  """Prefill against one forward pass over the same 32 prompts, and cached decoding of
  `new_tokens` tokens after a prompt at batch 1 and 32, through generate's own compiled
  functions (prefill, then decode's loop, timed apart): medians of `runs` timed runs after a
  warm-up. Random params (config.seed) and prompt tokens; no row stops early."""
  model = state.build_model(config)
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda params, tokens_BT: nnx.merge(graphdef, params)(tokens_BT))
  batch = 32
  rng = np.random.default_rng(0)
  prompts = rng.integers(1, config.model.vocab_size, (batch, prompt_len), np.int32)
  length = generate.buffer_length(prompt_len, new_tokens)

  def decode_rate(rows: int) -> float:
    tokens_BS = np.zeros((rows, length), np.int32)
    tokens_BS[:, :prompt_len] = prompts[:rows]
    lengths_B = np.full(rows, prompt_len, np.int32)
    prefilled = generate.prefill(model, prompts[:rows], length)
    seconds = _median_seconds(
      lambda: generate.decode(
        model, tokens_BS, lengths_B, prefilled, max_new_tokens=new_tokens, eos_id=-1
      ),
      runs,
    )
    return rows * new_tokens / seconds

  prefill_s = _median_seconds(lambda: generate.prefill(model, prompts, length), runs)
  prefill_rate = batch * prompt_len / prefill_s
  forward_rate = batch * prompt_len / _median_seconds(lambda: forward(params, prompts), runs)
  return dict(
    device=jax.devices()[0].device_kind,
    backbone=config.model.backbone,
    num_layers=config.model.num_layers,
    d_model=config.model.d_model,
    dtype=config.model.dtype,
    batch_size=batch,
    prompt_len=prompt_len,
    new_tokens=new_tokens,
    prefill_pieces=generate.prefill_pieces(prompt_len),
    prefill_tokens_per_sec=prefill_rate,
    forward_tokens_per_sec=forward_rate,
    prefill_over_forward=prefill_rate / forward_rate,
    decode_tokens_per_sec_b1=decode_rate(1),
    decode_tokens_per_sec_b32=decode_rate(batch),
  )


def profile(config: ml_collections.ConfigDict, folder: str, steps: int) -> dict[str, Any]:
  """A jax.profiler trace of `steps` bare train steps (compiled and warmed up first) under
  `folder`: plugins/profile/TIME/HOST.xplane.pb (TensorBoard's profile plugin, XProf) and
  HOST.trace.json.gz (ui.perfetto.dev)."""
  _, compiled, _, train_state, batch = _warm(config)
  with jax.profiler.trace(folder):
    for _ in range(steps):
      train_state, out = compiled(train_state, batch)
    jax.block_until_ready(out)
  traces = sorted(
    os.path.relpath(os.path.join(root, name), folder)
    for root, _, names in os.walk(folder)
    for name in names
    if name.endswith(".xplane.pb")
  )
  return dict(
    device=jax.devices()[0].device_kind,
    devices=jax.device_count(),
    batch_size=config.train.batch_size,
    seq_len=config.train.seq_len,
    steps=steps,
    folder=folder,
    traces=traces,
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
  elif _DECODE.value:
    result = decode(_CONFIG.value, _PROMPT_LEN.value, _NEW_TOKENS.value, _STEPS.value)
  elif _PROFILE.value:
    result = profile(_CONFIG.value, _PROFILE.value, _STEPS.value)
  else:
    result = run(_CONFIG.value, _STEPS.value)
  print(json.dumps(result))


if __name__ == "__main__":
  from absl import flags

  _CONFIG = cli.config_flag()
  _STEPS = flags.DEFINE_integer(
    "steps",
    20,
    "Timed steps per model (after one warm-up); --decode: timed runs; --profile: traced steps.",
    lower_bound=1,
  )
  _LOOP = flags.DEFINE_bool("loop", False, "The real train loop against the bare step.")
  _COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile seconds against the uniform twin as one scan."
  )
  _DATA = flags.DEFINE_bool("data", False, "Host tokens/s of the data pipeline per process.")
  _DECODE = flags.DEFINE_bool(
    "decode", False, "Prefill against a forward pass, cached decoding at batch 1 and 32."
  )
  _PROMPT_LEN = flags.DEFINE_integer("prompt_len", 512, "--decode: prompt tokens.", lower_bound=1)
  _NEW_TOKENS = flags.DEFINE_integer(
    "new_tokens", 64, "--decode: tokens generated per prompt.", lower_bound=1
  )
  _PROFILE = flags.DEFINE_string(
    "profile", None, "Write a jax.profiler trace of --steps bare train steps under this folder."
  )
  _HOSTS = flags.DEFINE_list("hosts", ["1", "2", "4"], "--data: simulated host counts.")
  flags.register_validator(
    "hosts",
    lambda hosts: all(h.isdigit() and int(h) for h in hosts),
    "should be positive integers, e.g. 1,2,4",
  )
  cli.run(main)
