"""The typed model spec: `config.model` as frozen dataclasses, validated once.

The model package reads nothing else. The field defaults here are the only
ones: `config.base_config()` builds its `model` section from them. Which
backbones exist is the registry's (tlm_jax/model/registry.py), so the backbone
name is checked there (`config.model_spec`). Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tlm_jax.errors import ConfigError

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


def require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def is_int(value: Any, low: int) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  require(value in choices, f"{field}={value!r} is unknown; use one of {choices}")


def check_ints(section: str, values: dict[str, Any], low: int) -> None:
  for field, value in values.items():
    what = "a positive integer" if low == 1 else f"an integer >= {low}"
    require(is_int(value, low), f"{section}.{field}={value!r} must be {what}")


def from_section(cls: type, section: Any, name: str) -> Any:
  """A spec dataclass from a ConfigDict section; missing fields take the defaults (older
  workdirs), unknown ones are an error (a typo would otherwise be ignored)."""
  values = dict(section)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  require(not unknown, f"{name} has unknown field(s) {unknown}; known: {sorted(fields)}")
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
    spec = from_section(cls, taper_cfg, "model.taper")
    spec.validate()
    return spec

  def validate(self) -> None:
    check_choice("model.taper.schedule", self.schedule, TAPER_SCHEDULES)
    check_choice("model.taper.renormalize", self.renormalize, RENORMALIZE)
    check_ints("model.taper", dict(tile=self.tile), 1)
    if self.schedule == "stepped":
      check_choice("model.taper.step_schedule", self.step_schedule, SMOOTH_SCHEDULES)
      check_ints("model.taper", dict(steps=self.steps), 1)
    if self.schedule in SMOOTH_SCHEDULES + ("stepped",):
      require(
        self.start > 0 and self.end > 0,
        f"model.taper.start={self.start} and model.taper.end={self.end} must both be "
        "positive: a layer cannot have zero or negative MLP width",
      )
    if self.schedule == "thirds":
      require(
        len(self.thirds) == 3 and min(self.thirds) > 0,
        f"model.taper.thirds={self.thirds} must be three positive multipliers "
        "(early, middle, late)",
      )
    uses_sigmoid = "sigmoid" in (self.schedule, self.schedule == "stepped" and self.step_schedule)
    if uses_sigmoid:
      require(self.steepness > 0, f"model.taper.steepness={self.steepness} must be positive")


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
  remat_chunks: chunks per rematerialised group of the memory scan: the backward
    pass keeps the memory state only at group boundaries and recomputes inside a
    group, and the memory's input rows, output and MAG's gate are recomputed
    too (0: keep every chunk's state and those). The default is the group size
    with the lowest per-chip peak of the 124m train step (BENCHMARKS.md,
    2026-12-07).
  """

  variant: str = "mag"  # mag (memory as a gate) | mal (memory as a layer) | mac (context)
  chunk_size: int = 64
  memory_depth: int = 2  # linear layers in each head's memory MLP
  memory_width: int = 128  # hidden width of the memory MLP
  max_inner_lr: float = 0.02  # theta_t = max_inner_lr * sigmoid(.)
  segment_size: int = 512
  mag_combine: str = "gate"
  unroll: bool = False
  max_grad_norm: float = 20.0
  remat_chunks: int = 4

  def validate(self) -> None:
    check_choice("model.titans.variant", self.variant, TITANS_VARIANTS)
    check_choice("model.titans.mag_combine", self.mag_combine, TITANS_MAG_COMBINES)
    fields = ("chunk_size", "memory_depth", "memory_width", "segment_size")
    check_ints("model.titans", {f: getattr(self, f) for f in fields}, 1)
    check_ints("model.titans", dict(remat_chunks=self.remat_chunks), 0)
    require(self.max_inner_lr >= 0, f"model.titans.max_inner_lr={self.max_inner_lr} must be >= 0")
    require(
      self.max_grad_norm >= 0, f"model.titans.max_grad_norm={self.max_grad_norm} must be >= 0"
    )
    require(
      self.variant != "mac" or self.segment_size % self.chunk_size == 0,
      f"model.titans.segment_size={self.segment_size} must be a multiple of "
      f"model.titans.chunk_size={self.chunk_size}: the memory steps over each segment in chunks",
    )
    require(
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
  remat_chunks: chunks per rematerialised group of an in-context level's scan:
    the backward pass keeps the level's weights only at group boundaries and
    recomputes inside a group (0: keep every chunk's weights), for one more
    forward pass of the in-context levels. The default: the 124m train step's
    per-chip peak by group size is in BENCHMARKS.md (2026-12-07).
  """

  chunk_sizes: tuple[int, ...] = (16, 64, 0)  # tokens between in-context updates; 0: ordinary
  width_fractions: tuple[float, ...] = (0.25, 0.25, 0.5)  # of the layer's CMS width
  inner_lrs: tuple[float, ...] = (3e-4, 3e-4, 0.0)
  max_step: float = 0.1
  level_tile: int = 128  # each level's width is a multiple of this
  unroll: bool = False
  remat_chunks: int = 16

  def validate(self) -> None:
    sizes, fractions, lrs = self.chunk_sizes, self.width_fractions, self.inner_lrs
    require(
      len(sizes) == len(fractions) == len(lrs) >= 1,
      "model.hope.chunk_sizes, width_fractions and inner_lrs need one entry per level; "
      f"got {sizes}, {fractions}, {lrs}",
    )
    require(
      all(is_int(c, 0) for c in sizes),
      f"model.hope.chunk_sizes={sizes} must be integers >= 0 (0: ordinary weights)",
    )
    require(
      min(fractions) > 0 and abs(sum(fractions) - 1) <= 1e-6,
      f"model.hope.width_fractions={fractions} must be positive and sum to 1",
    )
    check_ints("model.hope", dict(level_tile=self.level_tile), 1)
    check_ints("model.hope", dict(remat_chunks=self.remat_chunks), 0)
    require(
      min(lrs) >= 0 and self.max_step >= 0,
      f"model.hope.inner_lrs={lrs} and model.hope.max_step={self.max_step} must be >= 0",
    )
    require(isinstance(self.unroll, bool), f"model.hope.unroll={self.unroll!r} must be a bool")


@dataclasses.dataclass(frozen=True)
class ResidualSpec:
  """`model.residual`: the residual stream's width per layer (see tlm_jax/xshape.py)."""

  schedule: str = "uniform"  # uniform | xshape (wide ends, narrow middle) | custom
  ends: float = 1.5  # xshape: first and last layers' width / base width
  middle: float = 0.5  # xshape: mid-depth width / base width
  widths: tuple[int, ...] = ()  # custom only: explicit per-layer residual widths
  tile: int = 32  # widths are multiples of this (and of whole kv groups of heads)

  def validate(self) -> None:
    check_choice("model.residual.schedule", self.schedule, RESIDUAL_SCHEDULES)
    check_ints("model.residual", dict(tile=self.tile), 1)
    require(
      self.ends > 0 and self.middle > 0,
      f"model.residual.ends={self.ends} and model.residual.middle={self.middle} must be positive",
    )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """`config.model`, validated; the model package reads nothing else.

  `head_dim` is resolved (0 in the config means d_model // num_heads). Init std
  does not depend on a layer's MLP width: output projections get init_std /
  sqrt(2 * num_layers), everything else init_std; init="width_scaled" multiplies
  each MLP output projection's std by sqrt(mlp_width / layer width), so a tapered
  layer's MLP output variance at init matches the uniform model's.
  """

  backbone: str = "transformer"  # a name in tlm_jax/model/registry.py
  gate: str = "elementwise"  # gated_attention: headwise | elementwise
  gate_bias: bool = False  # gated_attention: a bias on the gate logits (the reference has none)
  vocab_size: int = 256
  d_model: int = 64
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 0  # 0: d_model // num_heads
  mlp_width: int = 256  # the uniform model's width F; the taper keeps the mean at F
  tie_embeddings: bool = False
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  init: str = "standard"  # standard | width_scaled
  dtype: str = "bfloat16"  # compute
  param_dtype: str = "float32"
  attention_impl: str = "xla"  # or "cudnn" on NVIDIA GPUs, "splash" (Pallas) on TPUs
  attention_window: int = 0  # > 0: sliding-window attention of that many tokens
  persistent_tokens: int = 0  # learned key/value slots every token attends to
  layers_mode: str = "unrolled"  # or "grouped"
  remat: str = "none"  # none | full | dots | dots_no_batch (see model/lm.py)
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
        values[name] = from_section(spec_cls, values[name], f"model.{name}")
    spec = from_section(cls, values, "model")
    spec.validate()
    return dataclasses.replace(spec, head_dim=spec.head_dim or spec.d_model // spec.num_heads)

  def at_width(self, width: int) -> ModelSpec:
    """The spec of a block at residual width `width` (the X shape, tlm_jax/xshape.py): same
    head_dim, query and kv heads scaled with the width (the kv-group size stays)."""
    if width == self.d_model:
      return self
    heads = width // self.head_dim
    group = self.num_heads // self.num_kv_heads
    return dataclasses.replace(self, d_model=width, num_heads=heads, num_kv_heads=heads // group)

  def validate(self) -> None:
    check_choice("model.gate", self.gate, GATES)
    check_choice("model.init", self.init, INITS)
    require(
      isinstance(self.gate_bias, bool), f"model.gate_bias={self.gate_bias!r} must be true or false"
    )
    sizes = ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_width")
    check_ints("model", {f: getattr(self, f) for f in sizes}, 1)
    require(
      is_int(self.head_dim, 0),
      f"model.head_dim={self.head_dim!r} must be a non-negative integer (0: d_model // num_heads)",
    )
    require(
      self.head_dim or self.d_model % self.num_heads == 0,
      f"model.num_heads={self.num_heads} does not divide model.d_model={self.d_model}: "
      "choose a head count that divides d_model, or set model.head_dim explicitly",
    )
    require(
      self.num_heads % self.num_kv_heads == 0,
      f"model.num_kv_heads={self.num_kv_heads} does not divide model.num_heads="
      f"{self.num_heads}: grouped-query attention shares each kv head among an equal "
      "number of query heads",
    )
    head_dim = self.head_dim or self.d_model // self.num_heads
    require(head_dim % 2 == 0, f"head dim {head_dim} is odd; RoPE needs an even model.head_dim")
    check_choice("model.layers_mode", self.layers_mode, LAYERS_MODES)
    check_choice("model.remat", self.remat, REMATS)
    check_choice("model.attention_impl", self.attention_impl, ATTENTION_IMPLS)
    check_choice("model.dtype", self.dtype, DTYPES)
    check_choice("model.param_dtype", self.param_dtype, DTYPES)
    windows = dict(attention_window=self.attention_window, persistent_tokens=self.persistent_tokens)
    check_ints("model", windows, 0)
    if self.attention_impl == "cudnn":
      require(
        not (self.attention_window or self.persistent_tokens),
        "model.attention_impl='cudnn' takes no model.attention_window or "
        "model.persistent_tokens here; use attention_impl='xla'",
      )
      require(
        self.dtype != "float32",
        "model.attention_impl='cudnn' needs model.dtype bfloat16 or float16",
      )
    if self.attention_impl == "splash":
      # The kernel takes causal / sliding-window masks only, and runs on TPUs (on the CPU
      # only in interpret mode, tests/test_splash.py); attend_context's masks stay on XLA.
      require(
        not self.persistent_tokens,
        "model.attention_impl='splash' takes no model.persistent_tokens (the slots every "
        "token sees are not a causal mask); set model.persistent_tokens=0 or use "
        "attention_impl='xla'",
      )
    self.titans.validate()
    self.hope.validate()
    self.taper.validate()
    self.residual.validate()
