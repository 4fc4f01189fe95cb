"""The decoder: token embedding, one block per layer (each with its own MLP width), head.

Layers are always stored one per slot (`blocks/0`, `blocks/1`, ...), whatever
`layers_mode` says, so a checkpoint loads in either mode unchanged:
- "unrolled": a Python loop over the blocks (fastest at run time on GPU,
  compile time grows with depth);
- "grouped": runs of consecutive blocks of equal shape are stacked at trace
  time and run by one `lax.scan`, so compile time grows with the number of
  distinct widths (a `stepped` taper gives K scans), not with depth.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax import taper
from tlm_jax.errors import ConfigError
from tlm_jax.model.attention import GATES, Attention, GatedAttention, head_dim
from tlm_jax.model.hope import CMS
from tlm_jax.model.layers import RMSNorm, SwiGLU, param
from tlm_jax.model.titans import VARIANTS, Titans

Array = jax.Array

# Token mixers by `model.backbone`. A mixer is built as Mixer(cfg, rngs=...),
# is called as mixer(x_BTD, positions_BT) and has static param_count(cfg) and
# flops_per_token(cfg, seq_len) so the taper table can cost it without building.
MIXERS = {"transformer": Attention, "gated_attention": GatedAttention, "titans": Titans,
          "hope_attention": Attention}
# The per-layer MLP (the part the taper sizes): SwiGLU, or Hope's CMS.
MLPS = {"hope_attention": CMS}


def mlp_class(cfg: Any) -> type:
  """Has param_count(cfg, width) and flops_per_token(cfg, width) like the mixers."""
  return MLPS.get(cfg.backbone, SwiGLU)


LAYERS_MODES = ("unrolled", "grouped")
# Named rematerialisation policies: what a block keeps from the forward pass.
REMAT_POLICIES = {
    "none": None,  # keep everything (no remat)
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ("xla", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")


def check_model_config(cfg: Any) -> None:
  """Fail early, naming the field, on shapes the decoder cannot take."""
  if cfg.backbone not in MIXERS:
    raise ConfigError(f"model.backbone={cfg.backbone!r} is unknown; use one of {sorted(MIXERS)}")
  for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "mlp_width"):
    if not (isinstance(cfg[field], int) and cfg[field] > 0):
      raise ConfigError(f"model.{field}={cfg[field]!r} must be a positive integer")
  if not (isinstance(cfg.head_dim, int) and cfg.head_dim >= 0):
    raise ConfigError(f"model.head_dim={cfg.head_dim!r} must be a non-negative integer "
                      "(0: d_model // num_heads)")
  if not cfg.head_dim and cfg.d_model % cfg.num_heads:
    raise ConfigError(
        f"model.num_heads={cfg.num_heads} does not divide model.d_model={cfg.d_model}: "
        "choose a head count that divides d_model, or set model.head_dim explicitly")
  if cfg.backbone == "gated_attention" and cfg.gate not in GATES:
    raise ConfigError(f"model.gate={cfg.gate!r} is unknown; use one of {GATES}")
  if cfg.backbone == "titans":
    check_titans_config(cfg)
  if cfg.backbone == "hope_attention":
    check_hope_config(cfg)
  if cfg.num_heads % cfg.num_kv_heads:
    raise ConfigError(
        f"model.num_kv_heads={cfg.num_kv_heads} does not divide model.num_heads="
        f"{cfg.num_heads}: grouped-query attention shares each kv head among an equal "
        "number of query heads")
  if head_dim(cfg) % 2:
    raise ConfigError(f"head dim {head_dim(cfg)} is odd; RoPE needs an even model.head_dim")
  if cfg.layers_mode not in LAYERS_MODES:
    raise ConfigError(f"model.layers_mode={cfg.layers_mode!r} is unknown; use one of {LAYERS_MODES}")
  if cfg.remat not in REMAT_POLICIES:
    raise ConfigError(f"model.remat={cfg.remat!r} is unknown; use one of {list(REMAT_POLICIES)}")
  if cfg.attention_impl not in ATTENTION_IMPLS:
    raise ConfigError(
        f"model.attention_impl={cfg.attention_impl!r} is unknown; use one of {ATTENTION_IMPLS}")
  for field in ("dtype", "param_dtype"):
    if cfg[field] not in DTYPES:
      raise ConfigError(f"model.{field}={cfg[field]!r} is unknown; use one of {DTYPES}")
  for field in ("attention_window", "persistent_tokens"):
    if not (isinstance(cfg[field], int) and cfg[field] >= 0):
      raise ConfigError(f"model.{field}={cfg[field]!r} must be a non-negative integer")
  if cfg.attention_impl == "cudnn" and (cfg.attention_window or cfg.persistent_tokens):
    raise ConfigError("model.attention_impl='cudnn' takes no model.attention_window or "
                      "model.persistent_tokens here; use attention_impl='xla'")
  if cfg.attention_impl == "cudnn" and cfg.dtype == "float32":
    raise ConfigError("model.attention_impl='cudnn' needs model.dtype bfloat16 or float16")


def check_titans_config(cfg: Any) -> None:
  t = cfg.titans
  if t.variant not in VARIANTS:
    raise ConfigError(f"model.titans.variant={t.variant!r} is unknown; use one of {VARIANTS}")
  for field in ("chunk_size", "memory_depth", "memory_width"):
    if not (isinstance(t[field], int) and t[field] > 0):
      raise ConfigError(f"model.titans.{field}={t[field]!r} must be a positive integer")


def check_hope_config(cfg: Any) -> None:
  h = cfg.hope
  sizes, fractions, lrs = tuple(h.chunk_sizes), tuple(h.width_fractions), tuple(h.inner_lrs)
  if not len(sizes) == len(fractions) == len(lrs) >= 1:
    raise ConfigError("model.hope.chunk_sizes, width_fractions and inner_lrs need one entry "
                      f"per level; got {sizes}, {fractions}, {lrs}")
  if any(not isinstance(c, int) or c < 0 for c in sizes):
    raise ConfigError(f"model.hope.chunk_sizes={sizes} must be integers >= 0 (0: ordinary weights)")
  if min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
    raise ConfigError(f"model.hope.width_fractions={fractions} must be positive and sum to 1")


class Block(nnx.Module):
  """Pre-norm residual block: x + mixer(norm(x)), then x + SwiGLU_width(norm(x))."""

  def __init__(self, cfg: Any, width: int, *, rngs: nnx.Rngs):
    pdt = jnp.dtype(cfg.param_dtype)
    self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    self.mixer = MIXERS[cfg.backbone](cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    self.mlp = mlp_class(cfg)(cfg, width, rngs=rngs)

  def __call__(self, x_BTD: Array, positions_BT: Array) -> Array:
    x_BTD = x_BTD + self.mixer(self.mixer_norm(x_BTD), positions_BT)
    return x_BTD + self.mlp(self.mlp_norm(x_BTD))


def layer_groups(widths: list[int], layers_mode: str) -> tuple[tuple[int, ...], ...]:
  """Layer indices per run: one run per layer when unrolled, equal-width runs when grouped."""
  if layers_mode == "unrolled":
    return tuple((l,) for l in range(len(widths)))
  groups: list[list[int]] = []
  for l, width in enumerate(widths):
    if groups and widths[groups[-1][0]] == width:
      groups[-1].append(l)
    else:
      groups.append([l])
  return tuple(tuple(g) for g in groups)


def run_blocks(blocks: list[Block], x_BTD: Array, positions_BT: Array, remat: str) -> Array:
  """One block as a call, or equal-shape blocks as one scan over params stacked on the fly."""
  graphdef, _ = nnx.split(blocks[0])

  def apply(x, state):
    return nnx.merge(graphdef, state)(x, positions_BT)

  if remat != "none":
    apply = jax.checkpoint(apply, policy=REMAT_POLICIES[remat])
  if len(blocks) == 1:
    return apply(x_BTD, nnx.state(blocks[0]))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[nnx.state(b) for b in blocks])
  return jax.lax.scan(lambda x, state: (apply(x, state), None), x_BTD, stacked)[0]


class Decoder(nnx.Module):
  """A decoder LM whose layer l has MLP width widths[l]."""

  def __init__(self, cfg: Any, widths: list[int], *, rngs: nnx.Rngs):
    check_model_config(cfg)
    if len(widths) != cfg.num_layers:
      raise ConfigError(f"got {len(widths)} widths for model.num_layers={cfg.num_layers}")
    pdt = jnp.dtype(cfg.param_dtype)
    self.embed = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt)
    self.blocks = nnx.List([Block(cfg, w, rngs=rngs) for w in widths])
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt)
    self.head = None if cfg.tie_embeddings else param(
        rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt)
    self.dtype = jnp.dtype(cfg.dtype)
    self.remat = cfg.remat
    self.widths = tuple(widths)
    self.groups = layer_groups(list(widths), cfg.layers_mode)

  def __call__(self, tokens_BT: Array, positions_BT: Array | None = None) -> Array:
    """Float32 next-token logits of shape (batch, time, vocab)."""
    return self.unembed(self.trunk(self.embed_tokens(tokens_BT), positions_BT))

  def embed_tokens(self, tokens_BT: Array) -> Array:
    return jnp.take(self.embed[...], tokens_BT, axis=0).astype(self.dtype)

  def trunk(self, x_BTD: Array, positions_BT: Array | None = None) -> Array:
    """All blocks and the final norm, from embeddings to the head's input."""
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(x_BTD.shape[1]), x_BTD.shape[:2])
    for group in self.groups:
      x_BTD = run_blocks([self.blocks[l] for l in group], x_BTD, positions_BT, self.remat)
    return self.final_norm(x_BTD)

  def unembed(self, h_BTD: Array) -> Array:
    w_DV = self.embed[...].T if self.head is None else self.head[...]
    return jnp.einsum("btd,dv->btv", h_BTD, w_DV.astype(self.dtype),
                      preferred_element_type=jnp.float32)


def build(config: Any, seed: int | None = None) -> Decoder:
  """The decoder for a full experiment config, with widths from its taper."""
  check_model_config(config.model)
  widths = taper.widths_from_config(config)
  return Decoder(config.model, widths,
                 rngs=nnx.Rngs(config.seed if seed is None else seed))


def set_layers_mode(model: Decoder, layers_mode: str) -> None:
  """Switch unrolled <-> grouped in place; the params are shared, nothing moves."""
  if layers_mode not in LAYERS_MODES:
    raise ConfigError(f"model.layers_mode={layers_mode!r} is unknown; use one of {LAYERS_MODES}")
  model.groups = layer_groups(list(model.widths), layers_mode)


def param_count(model: nnx.Module) -> int:
  """Parameters actually held by a built model."""
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
