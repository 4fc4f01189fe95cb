"""The training loop and its CLI.

    python -m tlm_jax.train --config configs/NAME.py[:ARG] --workdir DIR [--config.k=v ...]

Running the same command on the same workdir resumes from the latest
checkpoint, data position included; raising train.steps continues a run.
train.wandb.project logs the metrics to Weights & Biases too, one run across
restarts; train.profile_steps writes a profiler trace of a few steps.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from tlm_jax import checkpoint, cli, evaluate, metrics, optim, prefetch, sharding, state
from tlm_jax import config as config_lib
from tlm_jax import workdir as workdir_lib
from tlm_jax.data import pipeline, tokenizers


class Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop polls, so it can checkpoint and exit."""

  def __init__(self):
    self.requested = False
    self.previous = {
      sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)
    }

  def close(self) -> None:
    """Give the signals back (train() may run inside a longer-lived program)."""
    for sig, handler in self.previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    self.requested = True
    print(f"signal {signum}: saving a checkpoint and stopping", flush=True)

  def agreed(self) -> bool:
    """True on every process once any process was signalled."""
    if jax.process_count() == 1:
      return self.requested
    return bool(multihost_utils.process_allgather(np.asarray(self.requested)).any())


class StepTrace:
  """A jax.profiler trace of steps start..stop-1 (train.profile_steps, numbered as in
  metrics.jsonl), taken once, on process 0; a run resumed inside the range traces the
  rest of it."""

  def __init__(self, steps: Sequence[int], folder: str, enabled: bool):
    self.start, self.stop = tuple(steps) if steps and enabled else (0, 0)
    self.folder, self.active = folder, False

  def before(self, step: int) -> None:
    """Call before running step `step`."""
    if self.start <= step < self.stop and not self.active:
      jax.profiler.start_trace(self.folder)
      self.active = True

  def after(self, step: int, out: Any) -> float:
    """Call after step `step` was dispatched; seconds spent writing the trace (if it ended)."""
    if not self.active or step < self.stop - 1:
      return 0.0
    jax.block_until_ready(out)  # the traced steps finish inside the trace
    began = time.perf_counter()
    self.close()
    self.start = self.stop  # once
    return time.perf_counter() - began

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (or resume) to config.train.steps; returns the last training and eval rows.

  Signal handlers, the checkpointer, the writers and the progress bar are
  released on every way out, errors included.
  """
  with contextlib.ExitStack() as stack:
    return _train(config, workdir, stack)


def _train(
  config: ml_collections.ConfigDict, workdir: str, stack: contextlib.ExitStack
) -> dict[str, Any]:
  sharding.initialize_distributed(config.distributed)
  mesh = sharding.make_mesh(config.mesh)
  setup = state.setup(config, mesh)
  tcfg = config.train
  is_main = jax.process_index() == 0
  tokenizer = tokenizers.make_tokenizer(config.data)
  config_lib.check_vocab(config, tokenizer.vocab_size)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    workdir_lib.write_config(workdir, config)
    workdir_lib.write_widths(workdir, setup.widths)

  lr_at = optim.learning_rate_schedule(tcfg)
  eval_fn = evaluate.make_eval_step(setup.graphdef, tokenizer.bytes_per_token)
  data_iter = pipeline.make_iterator(
    config, "train", process_index=jax.process_index(), process_count=jax.process_count()
  )

  checkpoints = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)
  ckpt = checkpoint.Checkpointer(checkpoints, tcfg.keep_checkpoints)
  stack.callback(ckpt.close)
  stack.callback(ckpt.wait)  # runs first: pending async saves finish before closing
  start, train_state = ckpt.restore_latest(
    setup.abstract_state, data_iter, state.relayout(config, mesh)
  )
  if start is None:
    start, train_state = 0, setup.init_fn()
  elif is_main:
    print(f"resuming from step {start} in {workdir}", flush=True)
  batches = stack.enter_context(
    contextlib.closing(prefetch.batches(data_iter, setup.batch_sharding, tcfg.prefetch))
  )

  writer = stack.enter_context(
    contextlib.closing(metrics.MetricsWriter(workdir, enabled=is_main, config=config))
  )
  trace = stack.enter_context(
    contextlib.closing(
      StepTrace(tcfg.profile_steps, workdir_lib.path(workdir, workdir_lib.PROFILE), enabled=is_main)
    )
  )
  peak = tcfg.peak_flops or metrics.peak_flops_per_device()
  tokens_per_step = tcfg.batch_size * tcfg.seq_len
  preemption = stack.enter_context(contextlib.closing(Preemption()))
  progress = stack.enter_context(contextlib.closing(metrics.Progress(start, tcfg.steps, is_main)))
  last_train, last_eval = {}, {}
  # Throughput windows leave out compilation (this run's first step), evaluation and saving.
  window_start, window_steps, paused = time.perf_counter(), 0, 0.0

  def run_eval(step):
    split = config.data.eval_split
    row = evaluate.evaluate(config, eval_fn, train_state["params"], setup.batch_sharding, split)
    row = dict(step=step, split=split, **row)
    writer.write(row)
    progress.write(
      f"step {step} {split}: loss {row['loss']:.4f}, {row['bits_per_byte']:.3f} bits/byte"
    )
    return row

  step = start
  while step < tcfg.steps:
    batch, data_state = next(batches)
    trace.before(step + 1)
    step_start = time.perf_counter()
    train_state, out = setup.train_step(train_state, batch)
    step += 1
    if step == start + 1:  # it compiled the step
      jax.block_until_ready(out)
      paused += time.perf_counter() - step_start
    else:
      window_steps += 1
    paused += trace.after(step, out)
    last_step = step == tcfg.steps
    log = step % tcfg.log_every == 0 or last_step
    # Several hosts agree on preemption with a collective, so they ask only when logging.
    preempted = preemption.agreed() if log or jax.process_count() == 1 else False
    save = step % tcfg.checkpoint_every == 0 or last_step or preempted
    if log or save:
      out = jax.device_get(out)
      if out["bad_steps"]:
        good = ckpt.latest_step()
        where = (
          "there is no checkpoint yet"
          if good is None
          else f"the last good checkpoint is step {good}"
        )
        raise FloatingPointError(
          f"by step {step}, {out['bad_steps']} step(s) had a non-finite loss or gradient "
          f"(last loss {out['loss']}). Stopped without saving; {where}. Lower "
          "train.learning_rate or raise train.warmup_steps, then rerun."
        )
    if log:
      elapsed = time.perf_counter() - window_start - paused
      if not window_steps:  # only the compiling step so far: it is all there is to time
        elapsed, window_steps = elapsed + paused, 1
      tokens_per_sec = window_steps * tokens_per_step / elapsed
      last_train = dict(
        step=step,
        loss=float(out["loss"]),
        grad_norm=float(out["grad_norm"]),
        learning_rate=float(lr_at(step - 1)),
        tokens_seen=step * tokens_per_step,
        tokens_per_sec=tokens_per_sec,
        mfu=metrics.mfu(setup.flops_per_token, tokens_per_sec, jax.device_count(), peak),
      )
      writer.write(last_train)
      progress.update(last_train)
      window_start, window_steps, paused = time.perf_counter(), 0, 0.0
    evaluate_now = step % tcfg.eval_every == 0 or last_step
    if evaluate_now or save:
      jax.block_until_ready(out)  # queued steps belong to the window, not the pause
      pause_start = time.perf_counter()
      if evaluate_now:
        last_eval = run_eval(step)
      if save:
        ckpt.save(step, train_state, data_state, force=True)
      paused += time.perf_counter() - pause_start
    if preempted:
      ckpt.wait()
      if is_main:
        print(f"preempted at step {step}: rerun the same command to resume", flush=True)
      break
  return dict(train=last_train, eval=last_eval, step=step)


def main(argv: Sequence[str]) -> None:
  del argv
  result = train(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(json.dumps(result))
    print(
      f"results in {os.path.abspath(_WORKDIR.value)}: metrics.jsonl, checkpoints/, tensorboard/",
      flush=True,
    )


if __name__ == "__main__":
  from absl import flags

  _CONFIG = cli.config_flag()
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, config.")
  flags.mark_flag_as_required("workdir")
  cli.run(main)
