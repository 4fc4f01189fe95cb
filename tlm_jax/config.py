"""Config defaults, scales and presets, and the typed model spec, validated in one place.

An experiment file in configs/ parses its arg with `parse_arg` and builds its
config with `experiment` (or `base_config`); any field can still be
overridden with `--config.x=y`. The ConfigDict stays the CLI and file
surface (a workdir's `config.json`); `validate(config)` checks every section
once and returns the frozen `ModelSpec` the model is built from. Pure Python:
nothing here imports JAX.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from typing import Any

import ml_collections

from tlm_jax.errors import ConfigError

# Model shapes per scale. The paper does not publish d_model / layers / heads;
# these follow the usual GPT-3/Mamba/Titans sizes with a SwiGLU MLP at ~8/3 d
# (a multiple of 128) and a 32K vocabulary (the Llama-2 tokenizer of the
# likely recipe). Parameter totals are those of the uniform model.
SCALES = {
  # CPU tests and demos: byte vocabulary, widths in 32-wide tiles.
  "tiny": dict(
    vocab_size=256, d_model=64, num_layers=4, num_heads=4, num_kv_heads=2, mlp_width=256, tile=32
  ),
  # GPT-2-small shape (d768, 12 layers), 134M params untied.
  "124m": dict(
    vocab_size=32000,
    d_model=768,
    num_layers=12,
    num_heads=12,
    num_kv_heads=12,
    mlp_width=2048,
    tile=128,
  ),
  # Ablation scale, 30 layers (thirds of 10), 439M params.
  "440m": dict(
    vocab_size=32000,
    d_model=1024,
    num_layers=30,
    num_heads=16,
    num_kv_heads=16,
    mlp_width=2688,
    tile=128,
  ),
  # 778M params.
  "760m": dict(
    vocab_size=32000,
    d_model=1536,
    num_layers=24,
    num_heads=12,
    num_kv_heads=12,
    mlp_width=4096,
    tile=128,
  ),
  # 1.35B params with this MLP width; the Transformer's own is in SHAPES (1.308B).
  "1.3b": dict(
    vocab_size=32000,
    d_model=2048,
    num_layers=24,
    num_heads=16,
    num_kv_heads=16,
    mlp_width=5504,
    tile=128,
  ),
}

# Per-backbone shapes at the matched scales: what a backbone changes in SCALES so that
# its uniform model's total params land within 3% of the named size (tests/test_taper.py
# checks every backbone x scale from costs.py; `python -m tlm_jax.taper --json` reports
# them). Backbones keep the scale's d_model and heads; the ones whose mixers hold a few
# d x d more per layer (the gate; Hope's value maps) give it back from the MLP width, and
# Titans, whose memory + attention + gates hold ~2.4x a Transformer's mixer, from depth
# (a Titans MLP narrowed to fit 24 layers would leave little to taper). 124m stays the
# GPT-2-small shape everywhere (the benchmarks' shape).
SHAPES: dict[str, dict[str, dict[str, int]]] = {
  "transformer": {"1.3b": dict(mlp_width=5248)},  # 439M, 778M, 1.308B
  "gated_attention": {  # 435M, 764M, 1.295B
    "440m": dict(mlp_width=2304),
    "760m": dict(mlp_width=3456),
    "1.3b": dict(mlp_width=4480),
  },
  "titans": {  # 442M, 761M, 1.298B (mag)
    "440m": dict(num_layers=21, mlp_width=2560),
    "760m": dict(num_layers=15, mlp_width=4608),
    "1.3b": dict(num_layers=15, mlp_width=6144),
  },
  "hope_attention": {  # 443M, 764M, 1.301B
    "440m": dict(mlp_width=2048),
    "760m": dict(mlp_width=2944),
    "1.3b": dict(mlp_width=3840),
  },
}


# Taper presets: (field overrides of model.taper). The group multipliers of the
# paper's thirds experiment are unpublished; ours put 1.5x on one third and
# 0.75x on the other two, so the mean stays 1.
TAPERS = {
  "uniform": dict(schedule="uniform"),
  "cosine": dict(schedule="cosine", start=1.5, end=0.5),  # the paper's best
  "reverse": dict(schedule="cosine", start=0.5, end=1.5),  # late-heavy: hurts
  "linear": dict(schedule="linear", start=1.5, end=0.5),
  "sigmoid": dict(schedule="sigmoid", start=1.5, end=0.5),
  "early": dict(schedule="thirds", thirds=(1.5, 0.75, 0.75)),
  "middle": dict(schedule="thirds", thirds=(0.75, 1.5, 0.75)),
  "late": dict(schedule="thirds", thirds=(0.75, 0.75, 1.5)),
  "stepped": dict(schedule="stepped", start=1.5, end=0.5, steps=4, step_schedule="cosine"),
}

BACKBONES = ("transformer", "gated_attention", "titans", "hope_attention")
RECIPES = ("default", "paper")
# Training tokens of the paper recipe: 50B at 760m and 100B at 1.3b as published; 15B at
# 440m (Titans' budget at 400M; the TLM ablations' is unpublished); 20 per param at 124m.
PAPER_TOKENS = {"124m": 2.5e9, "440m": 15e9, "760m": 50e9, "1.3b": 100e9}
GATES = ("headwise", "elementwise")
INITS = ("standard", "width_scaled")
TITANS_VARIANTS = ("mag", "mal", "mac")
TITANS_MAG_COMBINES = ("gate", "mix")
LAYERS_MODES = ("unrolled", "grouped")
RESIDUAL_SCHEDULES = ("uniform", "xshape", "custom")
REMATS = ("none", "full", "dots", "dots_no_batch")
ATTENTION_IMPLS = ("xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16", "float16")
TAPER_SCHEDULES = ("uniform", "cosine", "linear", "sigmoid", "thirds", "stepped", "custom")
SMOOTH_SCHEDULES = ("cosine", "linear", "sigmoid")  # what a `stepped` taper may approximate
RENORMALIZE = ("scale", "shift")
LR_SCHEDULES = ("cosine", "constant", "wsd")
DATA_SOURCES = ("builtin", "local", "tfds")
TOKENIZERS = ("byte", "sentencepiece")
DISTRIBUTED = ("auto", "yes", "no")
MESH_AXES = ("data", "fsdp", "tensor")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.backbone = "transformer"  # or gated_attention, titans, hope_attention
  m.gate = "elementwise"  # gated_attention: headwise | elementwise
  m.gate_bias = False  # gated_attention: a bias on the gate logits (the reference has none)
  m.vocab_size = 256
  m.d_model = 64
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 4
  m.head_dim = 0  # 0: d_model // num_heads
  m.mlp_width = 256  # the uniform model's width F; the taper keeps the mean at F
  m.tie_embeddings = False
  m.rope_theta = 10_000.0
  m.norm_eps = 1e-6
  # Init std does not depend on a layer's MLP width: output projections get
  # init_std / sqrt(2 * num_layers), everything else init_std. init="width_scaled"
  # multiplies each MLP output projection's std by sqrt(mlp_width / layer width), so
  # a tapered layer's MLP output variance at init matches the uniform model's.
  m.init_std = 0.02
  m.init = "standard"  # standard | width_scaled
  m.dtype = "bfloat16"  # compute
  m.param_dtype = "float32"
  m.attention_impl = "xla"  # or "cudnn" on NVIDIA GPUs, "splash" (Pallas) on TPUs
  m.attention_window = 0  # > 0: sliding-window attention of that many tokens
  m.persistent_tokens = 0  # learned key/value slots every token attends to
  m.layers_mode = "unrolled"  # or "grouped"
  m.remat = "none"  # none | full | dots | dots_no_batch (see model/lm.py)

  # Titans (backbone="titans"); memory sizes and gate ranges are unpublished.
  m.titans = ml_collections.ConfigDict()
  m.titans.variant = "mag"  # mag (memory as a gate) | mal (memory as a layer) | mac (context)
  m.titans.chunk_size = 64  # tokens whose inner gradients share one memory state
  m.titans.memory_depth = 2  # linear layers in each head's memory MLP
  m.titans.memory_width = 128  # hidden width of the memory MLP
  m.titans.max_inner_lr = 0.02  # theta_t = max_inner_lr * sigmoid(.)
  m.titans.segment_size = 512  # mac: tokens per attention segment (a multiple of chunk_size)
  m.titans.mag_combine = "gate"  # mag: gate (the paper's y (x) M(x)) | mix (convex mix)
  m.titans.unroll = False  # unroll the chunk / segment scans (XLA counts a loop body once)
  m.titans.max_grad_norm = 20.0  # cap on each token's inner gradient norm; 0: uncapped

  # Hope-attention (backbone="hope_attention"): CMS levels, fastest first. The taper
  # sizes each layer's whole CMS; width_fractions split it over the levels (in-context
  # levels rounded to level_tile, the last level the rest). Step sizes are unpublished.
  m.hope = ml_collections.ConfigDict()
  m.hope.chunk_sizes = (16, 64, 0)  # tokens between in-context updates; 0: ordinary weights
  m.hope.width_fractions = (0.25, 0.25, 0.5)
  m.hope.inner_lrs = (3e-4, 3e-4, 0.0)  # per token: each update sums the chunk's gradients
  m.hope.max_step = 0.1  # an update moves each matrix by at most this x its norm; 0: no limit
  m.hope.level_tile = 128  # each level's width is a multiple of this
  m.hope.unroll = False  # unroll the chunk scans (XLA counts a loop body once)

  # Residual width per layer (the X-shaped ><former, tlm_jax/xshape.py); the ratios are
  # unpublished. The base width is solved so total params match the uniform model.
  m.residual = ml_collections.ConfigDict()
  m.residual.schedule = "uniform"  # uniform | xshape (wide ends, narrow middle) | custom
  m.residual.ends = 1.5  # xshape: first and last layers' width / base width
  m.residual.middle = 0.5  # xshape: mid-depth width / base width
  m.residual.widths = ()  # custom only: explicit per-layer residual widths
  m.residual.tile = 32  # widths are multiples of this (and of whole kv groups of heads)

  m.taper = t = ml_collections.ConfigDict()
  t.schedule = "cosine"
  t.start = 1.5
  t.end = 0.5
  t.steepness = 10.0  # sigmoid only; unpublished
  t.thirds = (1.0, 1.0, 1.0)  # thirds only: early, middle, late multipliers
  t.steps = 4  # stepped only: number of distinct widths
  t.step_schedule = "cosine"  # stepped only: the schedule approximated
  t.widths = ()  # custom only: explicit per-layer widths
  t.renormalize = "scale"  # how ratios with start + end != 2 meet the budget
  t.tile = 128

  c.data = d = ml_collections.ConfigDict()
  d.source = "builtin"  # builtin (offline: Python reference docs + stdlib source) | local | tfds
  d.name = ""  # tfds only: a prepared TFDS dataset, e.g. "lm1b", "c4/en"
  d.data_dir = ""  # TFDS folder (local or gs://); "": $TFDS_DATA_DIR or ~/tensorflow_datasets
  d.files = ""  # local only: glob(s) of .txt / .jsonl files, comma-separated
  d.text_field = "text"  # JSONL key (local) or TFDS feature (tfds) holding the text
  d.tokenizer = "byte"  # byte | sentencepiece
  d.spm_model = ""  # SentencePiece .model path when tokenizer="sentencepiece"
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
  return c


def parse_arg(arg: str | None, default_scale: str) -> tuple[str, str, str]:
  """'SCALE[,TAPER[,RECIPE]]' -> (scale, taper, recipe); the taper defaults to the paper's
  cosine 1.5 -> 0.5, the recipe to `default` (the CPU-friendly base config)."""
  parts = [p for p in (arg or "").split(",") if p]
  scale = parts[0] if parts else default_scale
  preset = parts[1] if len(parts) > 1 else "cosine"
  recipe = parts[2] if len(parts) > 2 else "default"
  if scale not in SCALES or preset not in TAPERS or recipe not in RECIPES or len(parts) > 3:
    raise ConfigError(
      f"config arg {arg!r} should be SCALE[,TAPER[,RECIPE]] with SCALE in {list(SCALES)}, "
      f"TAPER in {list(TAPERS)} and RECIPE in {list(RECIPES)}"
    )
  if recipe == "paper" and scale not in PAPER_TOKENS:
    raise ConfigError(f"recipe 'paper' is for scales {list(PAPER_TOKENS)}, not {scale!r}")
  return scale, preset, recipe


def experiment(
  scale: str, preset: str, backbone: str, recipe: str = "default"
) -> ml_collections.ConfigDict:
  """A backbone at a scale (its own shape there, `SHAPES`) with a taper preset and a training
  recipe; tiny runs in float32 at seq 128 for CPU tests."""
  config = base_config()
  config.model.backbone = backbone
  shape = dict(SCALES[scale], **SHAPES.get(backbone, {}).get(scale, {}))
  config.model.taper.tile = shape.pop("tile")
  config.model.update(shape)
  config.model.taper.update(TAPERS[preset])
  if scale == "tiny":
    config.model.dtype = "float32"
    config.train.seq_len = 128
  if recipe == "paper":
    paper_recipe(config, PAPER_TOKENS[scale])
  return config


def paper_recipe(config: ml_collections.ConfigDict, tokens: float) -> None:
  """The paper's likely recipe (PAPERS.md section 1): 4K context, 0.5M-token global batches
  (128 x 4096, as 4 accumulated microbatches of 32), AdamW lr 4e-4 with a cosine schedule and
  weight decay 0.1, `tokens` tokens, and a 32K SentencePiece tokenizer the user trains
  (`data.spm_model`; README). Warmup (2000 steps) is unpublished."""
  tr = config.train
  tr.update(seq_len=4096, batch_size=128, grad_accum=4, learning_rate=4e-4)
  tr.update(lr_schedule="cosine", weight_decay=0.1, min_lr_ratio=0.1, warmup_steps=2000)
  tr.update(steps=round(tokens / (128 * 4096)), eval_every=1000, checkpoint_every=1000)
  config.data.tokenizer = "sentencepiece"


def load(spec: str) -> ml_collections.ConfigDict:
  """A config file as `--config` reads it: 'path/to/file.py[:ARG]' -> get_config(ARG)."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise ConfigError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


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


# ---------------------------------------------------------------------------
# The typed model spec.
# ---------------------------------------------------------------------------


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _is_int(value: Any, low: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  _require(value in choices, f"{field}={value!r} is unknown; use one of {choices}")


def _check_ints(section: str, values: dict[str, Any], low: int) -> None:
  for field, value in values.items():
    what = "a positive integer" if low == 1 else f"an integer >= {low}"
    _require(_is_int(value, low), f"{section}.{field}={value!r} must be {what}")


def _from_section(cls: type, section: Any, name: str) -> Any:
  """A spec dataclass from a ConfigDict section; missing fields take the defaults (older
  workdirs), unknown ones are an error (a typo would otherwise be ignored)."""
  values = dict(section)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  _require(not unknown, f"{name} has unknown field(s) {unknown}; known: {sorted(fields)}")
  for key, value in values.items():
    if isinstance(value, (list, tuple)):
      values[key] = tuple(value)
  return cls(**values)


@dataclasses.dataclass(frozen=True)
class TaperSpec:
  """The taper part of a config (`config.model.taper`).

  start/end: width ratios of the first and last layer to the base width.
  steepness: slope of the sigmoid schedule in units of depth (unpublished in
    the paper; 10 puts ~99% of the change inside the stack).
  thirds: multipliers of the early, middle and late thirds.
  steps / step_schedule: a `stepped` taper uses `steps` distinct widths that
    approximate `step_schedule`, so grouped layers compile into `steps` scans.
  widths: explicit per-layer widths for `custom`.
  renormalize: how ratios that miss the budget are brought back to it (the
    paper does not say): `scale` multiplies every ideal width by the same
    factor, `shift` adds the same amount to every layer.
  tile: every width is a multiple of this (128 suits TPU MXUs and GPU tiles).
  """

  schedule: str = "cosine"
  start: float = 1.5
  end: float = 0.5
  steepness: float = 10.0
  thirds: tuple[float, float, float] = (1.0, 1.0, 1.0)
  steps: int = 4
  step_schedule: str = "cosine"
  widths: tuple[int, ...] = ()
  renormalize: str = "scale"
  tile: int = 128

  @classmethod
  def from_config(cls, taper_cfg: Any) -> TaperSpec:
    spec = _from_section(cls, taper_cfg, "model.taper")
    spec.validate()
    return spec

  def validate(self) -> None:
    _check_choice("model.taper.schedule", self.schedule, TAPER_SCHEDULES)
    _check_choice("model.taper.renormalize", self.renormalize, RENORMALIZE)
    _check_ints("model.taper", dict(tile=self.tile), 1)
    if self.schedule == "stepped":
      _check_choice("model.taper.step_schedule", self.step_schedule, SMOOTH_SCHEDULES)
      _check_ints("model.taper", dict(steps=self.steps), 1)
    if self.schedule in SMOOTH_SCHEDULES + ("stepped",):
      _require(
        self.start > 0 and self.end > 0,
        f"model.taper.start={self.start} and model.taper.end={self.end} must both be "
        "positive: a layer cannot have zero or negative MLP width",
      )
    if self.schedule == "thirds":
      _require(
        len(self.thirds) == 3 and min(self.thirds) > 0,
        f"model.taper.thirds={self.thirds} must be three positive multipliers "
        "(early, middle, late)",
      )
    uses_sigmoid = "sigmoid" in (self.schedule, self.schedule == "stepped" and self.step_schedule)
    if uses_sigmoid:
      _require(self.steepness > 0, f"model.taper.steepness={self.steepness} must be positive")


@dataclasses.dataclass(frozen=True)
class TitansSpec:
  """`model.titans`: the neural memory (sizes and gate ranges are unpublished).

  chunk_size: tokens whose inner gradients are taken at one memory state.
  segment_size: mac only, the attention segment (unpublished; 512, the sliding
    window the scale configs give mag and mal); a multiple of chunk_size.
  mag_combine: mag only, "gate" = norm(y) * sigmoid(norm(M(x))) (the paper's
    y (x) M(x)), "mix" = g(x) y + (1 - g(x)) M(x) with a learned sigmoid g (the
    earlier convex mix, kept for comparison).
  unroll: unroll the scans over chunks and mac segments; XLA's cost analysis
    counts a loop body once, so FLOP counts of the compiled step need it.
  max_grad_norm: each token's inner gradient (all memory layers) is scaled to
    at most this norm; 0 = the paper's uncapped rule. Inside a chunk the same
    stale gradient is applied up to chunk_size times and momentum amplifies it,
    so the chunked rule can diverge where the token-by-token one does not; with
    the cap and forgetting the memory stays bounded. Unpublished (a departure).
  """

  variant: str = "mag"
  chunk_size: int = 64
  memory_depth: int = 2
  memory_width: int = 128
  max_inner_lr: float = 0.02
  segment_size: int = 512
  mag_combine: str = "gate"
  unroll: bool = False
  max_grad_norm: float = 20.0

  def validate(self) -> None:
    _check_choice("model.titans.variant", self.variant, TITANS_VARIANTS)
    _check_choice("model.titans.mag_combine", self.mag_combine, TITANS_MAG_COMBINES)
    fields = ("chunk_size", "memory_depth", "memory_width", "segment_size")
    _check_ints("model.titans", {f: getattr(self, f) for f in fields}, 1)
    _require(self.max_inner_lr >= 0, f"model.titans.max_inner_lr={self.max_inner_lr} must be >= 0")
    _require(
      self.max_grad_norm >= 0, f"model.titans.max_grad_norm={self.max_grad_norm} must be >= 0"
    )
    _require(
      self.variant != "mac" or self.segment_size % self.chunk_size == 0,
      f"model.titans.segment_size={self.segment_size} must be a multiple of "
      f"model.titans.chunk_size={self.chunk_size}: the memory steps over each segment in chunks",
    )
    _require(
      isinstance(self.unroll, bool), f"model.titans.unroll={self.unroll!r} must be true or false"
    )


@dataclasses.dataclass(frozen=True)
class HopeSpec:
  """`model.hope`: Continuum Memory System levels, fastest first (tlm_jax/model/hope.py).

  inner_lrs: per-token step sizes; an update sums the gradients of its chunk's
    tokens (the paper's CMS rule), so a level's step does not shrink with its
    chunk size. Unpublished; 3e-4 trained the tiny config best of 0, 3e-4 and
    1e-3 (150 steps at lr 3e-3, one seed: 3.64, 3.58, 3.67 bits/byte).
  max_step: trust region of an in-context update, relative to each weight
    matrix's norm (0: plain gradient steps, which diverge at high outer lr).
  unroll: unroll the scans over chunks, for XLA's FLOP count of the compiled step.
  """

  chunk_sizes: tuple[int, ...] = (16, 64, 0)
  width_fractions: tuple[float, ...] = (0.25, 0.25, 0.5)
  inner_lrs: tuple[float, ...] = (3e-4, 3e-4, 0.0)
  max_step: float = 0.1
  level_tile: int = 128
  unroll: bool = False

  def validate(self) -> None:
    sizes, fractions, lrs = self.chunk_sizes, self.width_fractions, self.inner_lrs
    _require(
      len(sizes) == len(fractions) == len(lrs) >= 1,
      "model.hope.chunk_sizes, width_fractions and inner_lrs need one entry per level; "
      f"got {sizes}, {fractions}, {lrs}",
    )
    _require(
      all(_is_int(c, 0) for c in sizes),
      f"model.hope.chunk_sizes={sizes} must be integers >= 0 (0: ordinary weights)",
    )
    _require(
      min(fractions) > 0 and abs(sum(fractions) - 1) <= 1e-6,
      f"model.hope.width_fractions={fractions} must be positive and sum to 1",
    )
    _check_ints("model.hope", dict(level_tile=self.level_tile), 1)
    _require(
      min(lrs) >= 0 and self.max_step >= 0,
      f"model.hope.inner_lrs={lrs} and model.hope.max_step={self.max_step} must be >= 0",
    )
    _require(isinstance(self.unroll, bool), f"model.hope.unroll={self.unroll!r} must be a bool")


@dataclasses.dataclass(frozen=True)
class ResidualSpec:
  """`model.residual`: the residual stream's width per layer (see tlm_jax/xshape.py)."""

  schedule: str = "uniform"
  ends: float = 1.5
  middle: float = 0.5
  widths: tuple[int, ...] = ()
  tile: int = 32

  def validate(self) -> None:
    _check_choice("model.residual.schedule", self.schedule, RESIDUAL_SCHEDULES)
    _check_ints("model.residual", dict(tile=self.tile), 1)
    _require(
      self.ends > 0 and self.middle > 0,
      f"model.residual.ends={self.ends} and model.residual.middle={self.middle} must be positive",
    )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """`config.model`, validated; the model package reads nothing else.

  `head_dim` is resolved (0 in the config means d_model // num_heads).
  """

  backbone: str = "transformer"
  gate: str = "elementwise"
  gate_bias: bool = False
  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0
  mlp_width: int = 256
  tie_embeddings: bool = False
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  init: str = "standard"
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  attention_impl: str = "xla"
  attention_window: int = 0
  persistent_tokens: int = 0
  layers_mode: str = "unrolled"
  remat: str = "none"
  titans: TitansSpec = TitansSpec()
  hope: HopeSpec = HopeSpec()
  taper: TaperSpec = TaperSpec()
  residual: ResidualSpec = ResidualSpec()

  @classmethod
  def from_config(cls, model_cfg: Any) -> ModelSpec:
    values = dict(model_cfg)
    nested = dict(titans=TitansSpec, hope=HopeSpec, taper=TaperSpec, residual=ResidualSpec)
    for name, spec_cls in nested.items():
      if name in values:
        values[name] = _from_section(spec_cls, values[name], f"model.{name}")
    spec = _from_section(cls, values, "model")
    spec.validate()
    return dataclasses.replace(spec, head_dim=spec.head_dim or spec.d_model // spec.num_heads)

  def validate(self) -> None:
    _check_choice("model.backbone", self.backbone, BACKBONES)
    _check_choice("model.gate", self.gate, GATES)
    _check_choice("model.init", self.init, INITS)
    _require(
      isinstance(self.gate_bias, bool), f"model.gate_bias={self.gate_bias!r} must be true or false"
    )
    sizes = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_width")
    _check_ints("model", {f: getattr(self, f) for f in sizes}, 1)
    _require(
      _is_int(self.head_dim, 0),
      f"model.head_dim={self.head_dim!r} must be a non-negative integer (0: d_model // num_heads)",
    )
    _require(
      self.head_dim or self.d_model % self.num_heads == 0,
      f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}: "
      "choose a head count that divides d_model, or set model.head_dim explicitly",
    )
    _require(
      self.num_heads % self.num_kv_heads == 0,
      f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads="
      f"{self.num_heads}: grouped-query attention shares each kv head among an equal "
      "number of query heads",
    )
    head_dim = self.head_dim or self.d_model // self.num_heads
    _require(head_dim % 2 == 0, f"head dim {head_dim} is odd; RoPE needs an even model.head_dim")
    _check_choice("model.layers_mode", self.layers_mode, LAYERS_MODES)
    _check_choice("model.remat", self.remat, REMATS)
    _check_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    _check_choice("model.dtype", self.dtype, DTYPES)
    _check_choice("model.param_dtype", self.param_dtype, DTYPES)
    windows = dict(attention_window=self.attention_window, persistent_tokens=self.persistent_tokens)
    _check_ints("model", windows, 0)
    if self.attention_impl == "cudnn":
      _require(
        not (self.attention_window or self.persistent_tokens),
        "model.attention_impl='cudnn' takes no model.attention_window or "
        "model.persistent_tokens here; use attention_impl='xla'",
      )
      _require(
        self.dtype != "float32",
        "model.attention_impl='cudnn' needs model.dtype bfloat16 or float16",
      )
    if self.attention_impl == "splash":
      # The kernel takes causal / sliding-window masks only, and runs on TPUs (on the CPU
      # only in interpret mode, tests/test_splash.py); attend_context's masks stay on XLA.
      _require(
        not self.persistent_tokens,
        "model.attention_impl='splash' takes no model.persistent_tokens (the slots every "
        "token sees are not a causal mask); set model.persistent_tokens=0 or use "
        "attention_impl='xla'",
      )
      _require(
        self.backbone != "titans",
        "model.backbone='titans' takes no model.attention_impl='splash' (its prefix and "
        "segment masks are not causal / sliding-window ones); use attention_impl='xla'",
      )
    self.titans.validate()
    self.hope.validate()
    self.taper.validate()
    self.residual.validate()


def model_spec(config: Any) -> ModelSpec:
  """The validated model spec of a full experiment config."""
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
  _check_ints("train", {f: tcfg[f] for f in positive}, 1)
  _check_ints("train", dict(warmup_steps=tcfg.warmup_steps, prefetch=tcfg.prefetch), 0)
  _require(
    tcfg.learning_rate > 0,
    f"train.learning_rate={tcfg.learning_rate} must be positive (a negative rate ascends the loss)",
  )
  _check_choice("train.lr_schedule", tcfg.lr_schedule, LR_SCHEDULES)
  _require(
    tcfg.warmup_steps < tcfg.steps or tcfg.lr_schedule == "constant",
    f"train.warmup_steps={tcfg.warmup_steps} must be below train.steps={tcfg.steps}",
  )
  for field in ("min_lr_ratio", "decay_fraction"):
    _require(0 <= tcfg[field] <= 1, f"train.{field}={tcfg[field]} must lie in [0, 1]")
  for field in ("b1", "b2"):
    _require(0 <= tcfg[field] < 1, f"train.{field}={tcfg[field]} must lie in [0, 1)")
  for field in ("eps", "grad_clip"):
    _require(tcfg[field] > 0, f"train.{field}={tcfg[field]} must be positive")
  _require(tcfg.weight_decay >= 0, f"train.weight_decay={tcfg.weight_decay} must be >= 0")
  _require(tcfg.peak_flops >= 0, f"train.peak_flops={tcfg.peak_flops} must be >= 0 (0: look up)")
  _require(
    tcfg.batch_size % tcfg.grad_accum == 0,
    f"train.batch_size={tcfg.batch_size} must split into train.grad_accum={tcfg.grad_accum} "
    "equal microbatches",
  )


def validate_data(dcfg: Any) -> None:
  _check_choice("data.source", dcfg.source, DATA_SOURCES)
  _check_choice("data.tokenizer", dcfg.tokenizer, TOKENIZERS)
  _check_ints("data", dict(worker_count=dcfg.worker_count), 0)
  _require(
    dcfg.source != "tfds" or bool(dcfg.name),
    "data.source='tfds' needs data.name (a prepared TFDS dataset, e.g. lm1b)",
  )
  _require(
    dcfg.source != "local" or bool(dcfg.files),
    "data.source='local' needs data.files (glob(s) of .txt / .jsonl files)",
  )


def check_vocab(config: Any, tokenizer_vocab: int) -> None:
  """The model's vocabulary against its tokenizer's (train checks it; bench, aot and taper do
  not look at the tokenizer): it must hold every id, and a far larger one (unused rows over
  10% and 128, e.g. a 32K model with the 256-id byte tokenizer) needs
  data.allow_unused_vocab=True, so no one trains dead embedding rows by accident."""
  vocab = config.model.vocab_size
  _require(
    tokenizer_vocab <= vocab,
    f"the tokenizer has {tokenizer_vocab} ids but model.vocab_size={vocab}; raise model.vocab_size",
  )
  unused = vocab - tokenizer_vocab
  _require(
    unused <= max(128, vocab // 10) or config.data.allow_unused_vocab,
    f"model.vocab_size={vocab} but the {config.data.tokenizer} tokenizer has "
    f"{tokenizer_vocab} ids: {unused:,} embedding rows would never be used. Train a tokenizer "
    "of that size (python -m tlm_jax.data.tokenizers) and set data.tokenizer and "
    "data.spm_model, or set data.allow_unused_vocab=True if this is intended",
  )


def validate_mesh(mesh_cfg: Any) -> None:
  sizes = {a: mesh_cfg[a] for a in MESH_AXES}
  _require(
    all(_is_int(s, 1) or s == -1 for s in sizes.values()) and list(sizes.values()).count(-1) <= 1,
    f"mesh sizes {sizes} must be positive integers, with at most one -1 (fill)",
  )


def validate(config: Any) -> ModelSpec:
  """Check every section of an experiment config once; the model spec it describes."""
  _require(_is_int(config.seed, 0), f"seed={config.seed!r} must be an integer >= 0")
  spec = model_spec(config)
  validate_train(config.train)
  validate_data(config.data)
  validate_mesh(config.mesh)
  _check_choice("distributed.enabled", config.distributed.enabled, DISTRIBUTED)
  return spec
