"""LoRA adapters on the last layers of a decoder, trained on a small text set (frozen base).

Targets: the attention projections of the mixer (w_q, w_k, w_v, w_o; Titans'
memory projections have the same names and are included) and the MLP
projections (SwiGLU's three matrices, every CMS level's; not the CMS value
maps) of the last k layers. A weight W of any shape is read as a
(fan_in, fan_out) matrix (w_o: every axis but the last is fan_in; the others:
the first axis is) and adapted as

    W + (alpha / r) * A B,   A: (fan_in, r) ~ N(0, 1/fan_in),   B: (r, fan_out) = 0

The adapted weights are formed inside the jitted step and the unchanged model
code runs on them, so every backbone works as it is; the base params are an
input of the step and never an output, so they stay bit-identical.
`merge_adapters` gives the same weights as a plain params tree (a Decoder
without adapters). Adam with a constant step and no weight decay; Orbax
checkpoints (step, adapters, optimizer state) let a rerun resume.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from tlm_jax.analysis import blocks
from tlm_jax.errors import ConfigError
from tlm_jax.model import lm

MIXER_TARGETS = ("w_q", "w_k", "w_v", "w_o")
CHECKPOINT_EVERY = 200  # steps, and at the end
Params = dict[str, Any]  # a pure params dict, as nnx.to_pure_dict gives
Adapters = dict[str, dict[str, jax.Array]]  # "blocks.4.mlp.w_up" -> {"a": (in, r), "b": (r, out)}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything the trained adapters depend on (besides the model and the data)."""

  layers: int = 5  # the last k layers get adapters (clipped to the depth)
  rank: int = 8
  alpha: float = 16.0
  learning_rate: float = 1e-3
  epochs: int = 20
  batch_size: int = 8
  seed: int = 0

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def adapted_layers(num_layers: int, k: int) -> list[int]:
  return list(range(max(0, num_layers - k), num_layers))


def _key(part: str) -> str | int:
  return int(part) if part.isdigit() else part


def targets(params: Params, layers: Sequence[int]) -> dict[str, tuple[int, int]]:
  """{weight name: (fan_in, fan_out)} for the attention and MLP projections of `layers`."""
  found = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [str(k.key) for k in path]
    if keys[0] != "blocks" or int(keys[1]) not in layers:
      continue
    mixer = keys[2] == "mixer" and keys[-1] in MIXER_TARGETS
    mlp = keys[2] == "mlp" and leaf.ndim >= 2 and "values" not in keys
    if mixer or mlp:
      cut = leaf.ndim - 1 if keys[-1] == "w_o" else 1
      found[".".join(keys)] = math.prod(leaf.shape[:cut]), math.prod(leaf.shape[cut:])
  return found


def init_adapters(params: Params, layers: Sequence[int], rank: int, seed: int) -> Adapters:
  shapes = sorted(targets(params, layers).items())
  keys = jax.random.split(jax.random.key(seed), len(shapes))
  return {
    name: dict(
      a=jax.random.normal(key, (fan_in, rank), jnp.float32) * fan_in**-0.5,
      b=jnp.zeros((rank, fan_out), jnp.float32),
    )
    for key, (name, (fan_in, fan_out)) in zip(keys, shapes)
  }


def merge_adapters(params: Params, adapters: Adapters, scale: float) -> Params:
  """A new params dict with W + scale * A B at every adapted weight (the input is untouched)."""

  def replace(tree, parts, ab):
    if not parts:
      return tree + (scale * ab["a"] @ ab["b"]).reshape(tree.shape).astype(tree.dtype)
    key = _key(parts[0])
    return {**tree, key: replace(tree[key], parts[1:], ab)}

  for name, ab in adapters.items():
    params = replace(params, name.split("."), ab)
  return params


def read_texts(path: str, text_field: str = "text") -> list[str]:
  """Samples of a small set: .txt, one per non-empty line; .jsonl, one object per line."""
  if not os.path.isfile(path):
    raise ConfigError(f"--data={path} not found")
  if not path.endswith((".txt", ".jsonl")):
    raise ConfigError(f"--data={path} must be a .txt or .jsonl file")
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  if path.endswith(".txt"):
    return lines
  texts = [json.loads(line).get(text_field) for line in lines]
  if not all(isinstance(t, str) for t in texts):
    raise ConfigError(f"--data={path}: every line needs a string field {text_field!r}")
  return texts


def encode(texts: Sequence[str], tokenizer: Any, length: int) -> dict[str, np.ndarray]:
  """{'inputs', 'targets', 'mask'} (N, length): separator + text + separator, cut or
  right-padded to length + 1 tokens; the mask marks real targets. The leading
  separator is what precedes a document in the pretraining stream."""
  eos = tokenizer.eos_id
  tokens, mask = np.full((len(texts), length + 1), eos, np.int32), np.zeros((len(texts), length))
  for row, text in enumerate(texts):
    ids = np.concatenate([[eos], tokenizer.encode(text), [eos]])[: length + 1]
    tokens[row, : len(ids)] = ids
    mask[row, : len(ids) - 1] = 1
  return dict(inputs=tokens[:, :-1], targets=tokens[:, 1:], mask=mask.astype(np.float32))


def batch_rows(step: int, num: int, batch_size: int, seed: int) -> np.ndarray:
  """Rows of a step: epochs are seeded permutations; a short tail wraps into the same epoch."""
  per_epoch = -(-num // batch_size)
  perm = np.random.default_rng([seed, step // per_epoch]).permutation(num)
  return perm[(step % per_epoch * batch_size + np.arange(batch_size)) % num]


@functools.partial(jax.jit, static_argnums=(0, 1))
def batch_loss(
  graphdef: nnx.GraphDef, scale: float, adapters: Adapters, base: Params, batch: dict
) -> jax.Array:
  """Mean next-token loss over the batch's masked targets, adapters applied to the base."""
  logits_BTV = nnx.merge(graphdef, merge_adapters(base, adapters, scale))(batch["inputs"])
  nll_BT = blocks.token_nll(logits_BTV, batch["targets"]) * batch["mask"]
  return nll_BT.sum() / jnp.maximum(batch["mask"].sum(), 1.0)


def mean_loss(
  model: lm.Decoder, adapters: Adapters, scale: float, data: dict, batch_size: int
) -> float:
  """batch_loss over a whole set, in fixed-shape batches (the tail's padding rows masked)."""
  graphdef, params = nnx.split(model)
  base, num = nnx.to_pure_dict(params), len(data["inputs"])
  total = count = 0.0
  for start in range(0, num, batch_size):
    index = np.arange(start, start + batch_size)
    batch = {k: v[index % num] for k, v in data.items()}
    batch["mask"] = batch["mask"] * (index < num)[:, None]
    n = float(batch["mask"].sum())
    total += n * float(batch_loss(graphdef, scale, adapters, base, batch))
    count += n
  return total / max(count, 1.0)


def _replicated_like(params: Params) -> jax.sharding.Sharding:
  """Replicated over the mesh the params live on (their own device when they have none)."""
  sharding = jax.tree.leaves(params)[0].sharding
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec())
  return sharding


def train(
  model: lm.Decoder, data: dict[str, np.ndarray], settings: Settings, directory: str | None = None
) -> tuple[Adapters, list[float]]:
  """Adapters on the last settings.layers layers, trained on `data` (from `encode`).

  With `directory`, Orbax checkpoints there every CHECKPOINT_EVERY steps and at
  the end; a rerun resumes (or, finished, just restores). Returns the adapters
  and the loss of every step run by this call.
  """
  graphdef, params = nnx.split(model)
  base = nnx.to_pure_dict(params)
  tx = optax.adam(settings.learning_rate)
  layers = adapted_layers(len(model.blocks), settings.layers)
  adapters = init_adapters(base, layers, settings.rank, settings.seed)
  state = dict(step=jnp.zeros((), jnp.int32), adapters=adapters, opt_state=tx.init(adapters))
  state = jax.device_put(state, _replicated_like(base))  # where the step's outputs live
  total = settings.epochs * -(-len(data["inputs"]) // settings.batch_size)

  @jax.jit
  def step_fn(state, base, batch):
    loss, grads = jax.value_and_grad(batch_loss, argnums=2)(
      graphdef, settings.scale, state["adapters"], base, batch
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["adapters"])
    adapters = optax.apply_updates(state["adapters"], updates)
    return dict(step=state["step"] + 1, adapters=adapters, opt_state=opt_state), loss

  manager = None
  if directory:
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)
  losses = []
  try:
    if manager and manager.latest_step() is not None:
      state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(state))
    for step in range(int(state["step"]), total):
      batch_index = batch_rows(step, len(data["inputs"]), settings.batch_size, settings.seed)
      state, loss = step_fn(state, base, {k: v[batch_index] for k, v in data.items()})
      losses.append(float(loss))
      if manager and ((step + 1) % CHECKPOINT_EVERY == 0 or step + 1 == total):
        manager.save(step + 1, args=ocp.args.StandardSave(state))
  finally:
    if manager:
      manager.wait_until_finished()
      manager.close()
  return state["adapters"], losses
