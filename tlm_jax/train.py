"""The training loop and its CLI.

    python -m tlm_jax.train --config configs/NAME.py[:ARG] --workdir DIR [--config.k=v ...]

Running the same command on the same workdir resumes from the latest
checkpoint, data position included; raising train.steps continues a run.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from tlm_jax import checkpoint, evaluate, metrics, optim, sharding, taper
from tlm_jax.data import pipeline, tokenizers
from tlm_jax.errors import ConfigError
from tlm_jax.model import costs, lm


def init_state(config: Any, mesh: Any, tx: optax.GradientTransformation):
  """(graphdef, jitted init, shardings, abstract state) for {step, params, opt_state}."""
  graphdef, abstract_params = nnx.split(nnx.eval_shape(lambda: lm.build(config)))
  param_sh = sharding.state_shardings(abstract_params, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = optax.tree_map_params(
      tx, lambda _, s: s, jax.eval_shape(tx.init, abstract_params), param_sh,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, nnx.Variable))
  state_sh = dict(step=replicated, bad_steps=replicated, params=param_sh, opt_state=opt_sh)

  def init():
    params = nnx.state(lm.build(config))
    return dict(step=jnp.zeros((), jnp.int32), bad_steps=jnp.zeros((), jnp.int32),
                params=params, opt_state=tx.init(params))

  init_fn = jax.jit(init, out_shardings=state_sh)
  abstract = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(init), state_sh)
  return graphdef, init_fn, state_sh, abstract


class Setup(NamedTuple):
  graphdef: Any
  init_fn: Callable[[], dict]
  train_step: Callable
  abstract_state: Any  # ShapeDtypeStructs with this mesh's shardings
  batch_sh: NamedSharding


def setup(config: Any, mesh: Any) -> Setup:
  """The model graph, a sharded state init and the jitted train step on `mesh`."""
  tx = optim.make_optimizer(config.train)
  graphdef, init_fn, state_sh, abstract_state = init_state(config, mesh, tx)
  batch_sh = sharding.batch_sharding(mesh)
  step = make_train_step(graphdef, tx, config.train, state_sh, batch_sh)
  return Setup(graphdef, init_fn, step, abstract_state, batch_sh)


def make_train_step(graphdef, tx, tcfg: Any, state_sh, batch_sh):
  """jit(loss, grad (accumulated over tcfg.grad_accum microbatches), AdamW), state donated.

  A step whose loss or gradient is not finite leaves params and optimizer
  state untouched and counts itself in bad_steps; the loop checks that count
  before logging and saving, and stops.
  """
  accum = tcfg.grad_accum

  def loss_fn(params, inputs, targets):
    logits = nnx.merge(graphdef, params)(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def step(state, batch):
    params = state["params"]
    if accum == 1:
      loss, grads = grad_fn(params, batch["inputs"], batch["targets"])
    else:
      # Row r goes to microbatch r % accum, so each device's rows stay local.
      micro = jax.tree.map(lambda x: x.reshape(-1, accum, x.shape[-1]).swapaxes(0, 1), batch)

      def add(carry, mb):
        loss_g = grad_fn(params, mb["inputs"], mb["targets"])
        return jax.tree.map(jnp.add, carry, loss_g), None

      zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(add, zero, micro)
      loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new = (optax.apply_updates(params, updates), opt_state)
    params, opt_state = jax.tree.map(
        lambda n, o: jnp.where(ok, n, o), new, (params, state["opt_state"]))
    bad_steps = state["bad_steps"] + (~ok).astype(jnp.int32)
    out = dict(step=state["step"] + 1, bad_steps=bad_steps, params=params, opt_state=opt_state)
    return out, dict(loss=loss, grad_norm=grad_norm, bad_steps=bad_steps)

  return jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                 donate_argnums=0)


def check_config(config: Any, mesh: Any) -> None:
  tcfg = config.train
  sharding.check_batch(tcfg.batch_size, mesh)
  parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if tcfg.batch_size % (parallel * tcfg.grad_accum):
    raise ConfigError(
        f"train.batch_size={tcfg.batch_size} must split into train.grad_accum="
        f"{tcfg.grad_accum} microbatches of a multiple of data x fsdp = {parallel}")
  lm.check_model_config(config.model)


def write_run_files(config: Any, workdir: str, widths: list[int]) -> None:
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=1, sort_keys=True))
  with open(os.path.join(workdir, "widths.json"), "w") as f:
    json.dump(widths, f)


class Preemption:
  """Turns SIGTERM/SIGINT into a flag the loop polls, so it can checkpoint and exit."""

  def __init__(self):
    self.requested = False
    self.previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

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


def train(config: Any, workdir: str) -> dict[str, Any]:
  """Train (or resume) to config.train.steps; returns the last training and eval rows."""
  sharding.initialize_distributed(config.distributed)
  mesh = sharding.make_mesh(config.mesh)
  check_config(config, mesh)
  tcfg = config.train
  widths = taper.widths_from_config(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    write_run_files(config, workdir, widths)

  lr_at = optim.learning_rate_schedule(tcfg)
  graphdef, init_fn, train_step, abstract_state, batch_sh = setup(config, mesh)
  tokenizer = tokenizers.make_tokenizer(config.data)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(
        f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size="
        f"{config.model.vocab_size}; raise model.vocab_size")
  eval_fn = evaluate.make_eval_step(graphdef, tokenizer.bytes_per_token)
  data_iter = pipeline.make_iterator(
      config, "train", process_index=jax.process_index(), process_count=jax.process_count())

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), tcfg.keep_checkpoints)
  start = ckpt.latest_step()
  if start is None:
    state = init_fn()
    start = 0
  else:
    state = ckpt.restore(start, abstract_state, data_iter)
    if is_main:
      print(f"resuming from step {start} in {workdir}", flush=True)

  writer = metrics.MetricsWriter(workdir, enabled=is_main)
  flops_per_token = costs.flops_per_token(config.model, widths, tcfg.seq_len)
  peak = tcfg.peak_flops or metrics.peak_flops_per_device()
  tokens_per_step = tcfg.batch_size * tcfg.seq_len
  preemption = Preemption()
  progress = _progress_bar(start, tcfg.steps, enabled=is_main)
  last_train, last_eval = {}, {}
  window_start, window_steps = time.perf_counter(), 0

  def run_eval(step):
    row = evaluate.evaluate(config, eval_fn, state["params"], batch_sh, config.data.eval_split)
    row = dict(step=step, split=config.data.eval_split, **row)
    writer.write(row)
    return row

  step = start
  while step < tcfg.steps:
    batch = sharding.to_global(next(data_iter), batch_sh)
    state, out = train_step(state, batch)
    step += 1
    window_steps += 1
    last_step = step == tcfg.steps
    log = step % tcfg.log_every == 0 or last_step
    # Several hosts agree on preemption with a collective, so they ask only when logging.
    preempted = preemption.agreed() if log or jax.process_count() == 1 else False
    save = step % tcfg.checkpoint_every == 0 or last_step or preempted
    if log or save:
      out = jax.device_get(out)
      if out["bad_steps"]:
        raise FloatingPointError(
            f"by step {step}, {out['bad_steps']} step(s) had a non-finite loss or gradient "
            f"(last loss {out['loss']}). Stopped without saving; the last good checkpoint is "
            f"step {ckpt.latest_step()}. Lower train.learning_rate or raise "
            "train.warmup_steps, then rerun.")
    if log:
      elapsed = time.perf_counter() - window_start
      tokens_per_sec = window_steps * tokens_per_step / elapsed
      last_train = dict(
          step=step, loss=float(out["loss"]), grad_norm=float(out["grad_norm"]),
          learning_rate=float(lr_at(step - 1)), tokens_seen=step * tokens_per_step,
          tokens_per_sec=tokens_per_sec,
          mfu=metrics.mfu(flops_per_token, tokens_per_sec, jax.device_count(), peak))
      writer.write(last_train)
      progress.update(step - progress.n)
      mfu_text = "n/a" if last_train["mfu"] is None else f"{last_train['mfu']:.1%}"
      progress.set_postfix(loss=f"{last_train['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}",
                           mfu=mfu_text, refresh=False)
      window_start, window_steps = time.perf_counter(), 0
    if step % tcfg.eval_every == 0 or last_step:
      last_eval = run_eval(step)
    if save:
      ckpt.save(step, state, data_iter, force=True)
    if preempted:
      ckpt.wait()
      if is_main:
        print(f"preempted at step {step}: rerun the same command to resume", flush=True)
      break
  ckpt.wait()
  ckpt.close()
  preemption.close()
  progress.close()
  writer.close()
  return dict(train=last_train, eval=last_eval, step=step)


def _progress_bar(start: int, total: int, enabled: bool):
  from tqdm import tqdm

  return tqdm(initial=start, total=total, disable=not enabled, unit="step", dynamic_ncols=True)


def main(argv: Sequence[str]) -> None:
  del argv
  result = train(_CONFIG.value, _WORKDIR.value)
  if jax.process_index() == 0:
    print(json.dumps(result))
    print(f"results in {os.path.abspath(_WORKDIR.value)}: metrics.jsonl, checkpoints/, "
          "tensorboard/", flush=True)


if __name__ == "__main__":
  from absl import app, flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:arg].")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, config.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
