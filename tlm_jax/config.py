"""Config defaults, loading and validation: the ConfigDict is the CLI and file surface.

`base_config()` gives every field (the model section from the typed spec's
defaults, tlm_jax/spec.py); experiment files in configs/ start from
`presets.experiment`; `load` reads `file.py[:ARG]` or a workdir's
`config.json`; `validate(config)` checks every section once and returns the
frozen `ModelSpec` the model is built from. Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import ml_collections

from tlm_jax.errors import ConfigError
from tlm_jax.model import registry
from tlm_jax.spec import ModelSpec, check_choice, check_ints, is_int, require

LR_SCHEDULES = ("cosine", "constant", "wsd")
DATA_SOURCES = ("builtin", "local", "tfds")
TOKENIZERS = ("byte", "sentencepiece", "hf")
DISTRIBUTED = ("auto", "yes", "no")
MESH_AXES = ("data", "fsdp", "tensor")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # Model defaults are the spec's (tlm_jax/spec.py), written there once.
  c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelSpec()))

  c.data = d = ml_collections.ConfigDict()
  d.source = "builtin"  # builtin (offline: Python reference docs + stdlib source) | local | tfds
  d.name = ""  # tfds only: a prepared TFDS dataset, e.g. "lm1b", "c4/en"
  d.data_dir = ""  # TFDS folder (local or gs://); "": $TFDS_DATA_DIR or ~/tensorflow_datasets
  d.files = ""  # local only: glob(s) of .txt / .jsonl / .parquet files, comma-separated
  d.text_field = "text"  # JSONL key / Parquet column (local) or TFDS feature (tfds) of the text
  d.tokenizer = "byte"  # byte | sentencepiece | hf
  d.spm_model = ""  # SentencePiece .model path when tokenizer="sentencepiece"
  d.hf_tokenizer = ""  # tokenizer.json path (or a folder holding one) when tokenizer="hf"
  # train refuses a model vocabulary far larger than the tokenizer's (rows never used)
  # unless this says it is intended
  d.allow_unused_vocab = False
  d.worker_count = 0  # Grain prefetch worker processes
  d.pretokenized = False  # read windows packed once by tlm_jax.data.pretokenize (scales to pods)
  d.eval_split = "validation"

  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = "auto"  # auto (multi-host TPU pods) | yes | no
  c.distributed.coordinator = ""  # host:port; empty: from the environment
  c.distributed.num_processes = 1
  c.distributed.process_id = 0

  c.train = tr = ml_collections.ConfigDict()
  tr.steps = 1000
  tr.batch_size = 32  # global, in sequences
  tr.seq_len = 1024
  tr.grad_accum = 1  # microbatches per step
  tr.prefetch = 2  # global batches fetched ahead on a background thread; 0: none
  tr.learning_rate = 4e-4  # peak; the Titans recipe's AdamW lr
  tr.lr_schedule = "cosine"  # cosine | constant | wsd (warmup-stable-decay)
  tr.warmup_steps = 100
  tr.min_lr_ratio = 0.1  # floor of cosine / end of wsd decay, as a fraction of peak
  tr.decay_fraction = 0.2  # wsd only: share of steps spent decaying
  tr.b1 = 0.9
  tr.b2 = 0.95
  tr.eps = 1e-8
  tr.weight_decay = 0.1  # matrices only; norms and biases are not decayed
  tr.grad_clip = 1.0  # global norm
  tr.log_every = 10
  tr.eval_every = 500
  tr.eval_batches = 8
  tr.checkpoint_every = 500
  tr.keep_checkpoints = 3
  tr.peak_flops = 0.0  # per device, for MFU; 0: look up by device kind
  # (start, stop): a jax.profiler trace of steps start..stop-1 (numbered as in metrics.jsonl)
  # in W/profile/; (): none
  tr.profile_steps = ()
  # Weights & Biases: the rows of metrics.jsonl, in one run across restarts (the extra
  # `pip install 'tlm_jax[wandb]'`; WANDB_MODE=offline writes W/wandb/ only). project "": off
  tr.wandb = ml_collections.ConfigDict(dict(project="", name="", tags=()))
  return c


def load(spec: str) -> ml_collections.ConfigDict:
  """A config file as `--config` reads it: 'path/to/file.py[:ARG]' -> get_config(ARG)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def from_json(path: str) -> ml_collections.ConfigDict:
  """A workdir's config.json laid over today's defaults, so older workdirs (missing fields
  added since) still load; fields a newer version wrote are kept as they are."""
  if not os.path.exists(path):
    raise ConfigError(f"{path} not found: --workdir must be a folder written by tlm_jax.train")
  with open(path) as f:
    saved = json.load(f)
  config = base_config()
  _overlay(config, saved)
  _keep_trained_behaviour(config, saved.get("model", {}))
  return config


def _keep_trained_behaviour(config: ml_collections.ConfigDict, saved_model: dict[str, Any]) -> None:
  """Fields added with a new default take, in a workdir written before them, the value that
  reproduces what it trained: a gate bias, and Hope's mean-loss inner step (lr / C per
  token, no trust region)."""
  if "gate_bias" not in saved_model:
    config.model.gate_bias = True
  hope = saved_model.get("hope", {})
  if hope and "max_step" not in hope:
    config.model.hope.max_step = 0.0
    lrs = zip(config.model.hope.inner_lrs, config.model.hope.chunk_sizes)
    config.model.hope.inner_lrs = tuple(lr / chunk if chunk else lr for lr, chunk in lrs)


def _overlay(node: ml_collections.ConfigDict, saved: dict[str, Any]) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
      _overlay(node[key], value)
    elif key in node and isinstance(node[key], tuple):
      node[key] = tuple(value)
    elif key in node:
      node[key] = value
    else:
      with node.unlocked():
        node[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value


def model_spec(config: Any) -> ModelSpec:
  """The validated model spec of a full experiment config (the backbone from the registry)."""
  backbone = registry.get(config.model.backbone)
  require(
    backbone.splash or config.model.attention_impl != "splash",
    f"model.backbone={config.model.backbone!r} takes no model.attention_impl='splash' (its "
    "attention masks are not causal / sliding-window ones); use attention_impl='xla'",
  )
  return ModelSpec.from_config(config.model)


def tensor_parallel_size(config: Any) -> int:
  """The tensor axis size when the config fixes one (-1 means 'fill', unknown here)."""
  size = config.mesh.tensor if "mesh" in config else 1
  return size if size > 0 else 1


# ---------------------------------------------------------------------------
# The other sections, checked in the same place.
# ---------------------------------------------------------------------------


def validate_train(tcfg: Any) -> None:
  positive = (
    "steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "log_every",
    "eval_every",
    "eval_batches",
    "checkpoint_every",
    "keep_checkpoints",
  )
  check_ints("train", {f: tcfg[f] for f in positive}, 1)
  check_ints("train", dict(warmup_steps=tcfg.warmup_steps, prefetch=tcfg.prefetch), 0)
  require(
    tcfg.learning_rate > 0,
    f"train.learning_rate={tcfg.learning_rate} must be positive (a negative rate ascends the loss)",
  )
  check_choice("train.lr_schedule", tcfg.lr_schedule, LR_SCHEDULES)
  require(
    tcfg.warmup_steps < tcfg.steps or tcfg.lr_schedule == "constant",
    f"train.warmup_steps={tcfg.warmup_steps} must be below train.steps={tcfg.steps}",
  )
  for field in ("min_lr_ratio", "decay_fraction"):
    require(0 <= tcfg[field] <= 1, f"train.{field}={tcfg[field]} must lie in [0, 1]")
  for field in ("b1", "b2"):
    require(0 <= tcfg[field] < 1, f"train.{field}={tcfg[field]} must lie in [0, 1)")
  for field in ("eps", "grad_clip"):
    require(tcfg[field] > 0, f"train.{field}={tcfg[field]} must be positive")
  require(tcfg.weight_decay >= 0, f"train.weight_decay={tcfg.weight_decay} must be >= 0")
  require(tcfg.peak_flops >= 0, f"train.peak_flops={tcfg.peak_flops} must be >= 0 (0: look up)")
  require(
    tcfg.batch_size % tcfg.grad_accum == 0,
    f"train.batch_size={tcfg.batch_size} must split into train.grad_accum={tcfg.grad_accum} "
    "equal microbatches",
  )
  profile = tuple(tcfg.profile_steps)
  require(
    not profile
    or (len(profile) == 2 and all(is_int(s, 1) for s in profile) and profile[0] < profile[1]),
    f"train.profile_steps={profile} must be () or (start, stop) with 1 <= start < stop, "
    "e.g. (10, 13) traces steps 10, 11 and 12",
  )


def validate_data(dcfg: Any) -> None:
  check_choice("data.source", dcfg.source, DATA_SOURCES)
  check_choice("data.tokenizer", dcfg.tokenizer, TOKENIZERS)
  check_ints("data", dict(worker_count=dcfg.worker_count), 0)
  require(
    dcfg.source != "tfds" or bool(dcfg.name),
    "data.source='tfds' needs data.name (a prepared TFDS dataset, e.g. lm1b)",
  )
  require(
    dcfg.source != "local" or bool(dcfg.files),
    "data.source='local' needs data.files (glob(s) of .txt / .jsonl / .parquet files)",
  )


def check_vocab(config: Any, tokenizer_vocab: int) -> None:
  """The model's vocabulary against its tokenizer's (train checks it; bench, aot and taper do
  not look at the tokenizer): it must hold every id, and a far larger one (unused rows over
  10% and 128, e.g. a 32K model with the 256-id byte tokenizer) needs
  data.allow_unused_vocab=True, so no one trains dead embedding rows by accident."""
  vocab = config.model.vocab_size
  require(
    tokenizer_vocab <= vocab,
    f"the tokenizer has {tokenizer_vocab} ids but model.vocab_size={vocab}; raise model.vocab_size",
  )
  unused = vocab - tokenizer_vocab
  require(
    unused <= max(128, vocab // 10) or config.data.allow_unused_vocab,
    f"model.vocab_size={vocab} but the {config.data.tokenizer} tokenizer has "
    f"{tokenizer_vocab} ids: {unused:,} embedding rows would never be used. Train a tokenizer "
    "of that size (python -m tlm_jax.data.tokenizers) and set data.tokenizer and "
    "data.spm_model (or data.hf_tokenizer), or set data.allow_unused_vocab=True if this is "
    "intended",
  )


def validate_mesh(mesh_cfg: Any) -> None:
  sizes = {a: mesh_cfg[a] for a in MESH_AXES}
  require(
    all(is_int(s, 1) or s == -1 for s in sizes.values()) and list(sizes.values()).count(-1) <= 1,
    f"mesh sizes {sizes} must be positive integers, with at most one -1 (fill)",
  )


def validate(config: Any) -> ModelSpec:
  """Check every section of an experiment config once; the model spec it describes."""
  require(is_int(config.seed, 0), f"seed={config.seed!r} must be an integer >= 0")
  spec = model_spec(config)
  validate_train(config.train)
  validate_data(config.data)
  validate_mesh(config.mesh)
  check_choice("distributed.enabled", config.distributed.enabled, DISTRIBUTED)
  return spec
