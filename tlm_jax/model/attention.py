"""Causal softmax attention with RoPE and grouped-query heads (the Transformer mixer)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax.model import splash
from tlm_jax.model.costs import gate_shape
from tlm_jax.model.layers import output_std, param, rope
from tlm_jax.spec import ModelSpec

Array = jax.Array


class Attention(nnx.Module):
  """q/k/v projections, RoPE, `jax.nn.dot_product_attention`, output projection.

  `spec.attention_impl` picks the kernel: "xla" runs everywhere, "cudnn" is the
  fused flash kernel on NVIDIA GPUs (bf16/fp16 only), "splash" the Pallas one on
  TPUs (model/splash.py; decoding and attend_context's masks stay on XLA).
  `spec.attention_window` > 0 makes it sliding-window (each token sees that
  many, itself included);
  `spec.persistent_tokens` > 0 adds learned key/value slots every token sees,
  with no position (Titans' persistent memory, as keys and values directly).
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    d, n, k, h = spec.d_model, spec.num_heads, spec.num_kv_heads, spec.head_dim
    pdt, std = jnp.dtype(spec.param_dtype), spec.init_std
    self.w_q = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std, pdt)
    self.w_k = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pdt)
    self.w_v = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std, pdt)
    self.w_o = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), output_std(spec), pdt)
    self.window, self.persistent = spec.attention_window, spec.persistent_tokens
    if self.persistent:
      shape, axes = (self.persistent, k, h), (None, "kv_heads", "head_dim")
      self.persistent_k = param(rngs, shape, axes, std, pdt)
      self.persistent_v = param(rngs, shape, axes, std, pdt)
    self.dtype = jnp.dtype(spec.dtype)
    self.rope_theta = spec.rope_theta
    self.use_splash = spec.attention_impl == "splash"
    self.implementation = "cudnn" if spec.attention_impl == "cudnn" else None

  def __call__(self, x_BTD: Array, positions_BT: Array) -> Array:
    return self.output(x_BTD, self.attend(x_BTD, positions_BT))

  def output(self, x_BTD: Array, y_BTNH: Array) -> Array:
    """Per-head outputs -> the residual update; one place, so decoding reuses subclasses'."""
    del x_BTD
    return self.project(y_BTNH)

  def init_cache(self, batch: int, length: int) -> dict[str, Array]:
    """Empty key/value slots for a sequence of up to `length` tokens; `end` counts the filled."""
    shape = (batch, length, *self.w_k.shape[1:])
    zeros = jnp.zeros(shape, self.dtype)
    return dict(k_BSKH=zeros, v_BSKH=zeros, end=jnp.zeros((), jnp.int32))

  def decode(
    self,
    x_BTD: Array,
    positions_BT: Array,
    cache: dict[str, Array],
    prefix_BPD: Array | None = None,
    prefix_positions_BP: Array | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    """The next T tokens of a sequence whose earlier keys/values are cached: equals
    __call__ on the whole sequence at these positions. prefix: rows whose keys and values
    every query sees (Titans' persistent tokens, as its attention's context)."""
    prefix = 0 if prefix_BPD is None else prefix_BPD.shape[1]
    context_BSD, context_positions_BS = x_BTD, positions_BT
    if prefix:
      context_BSD = jnp.concatenate([prefix_BPD.astype(x_BTD.dtype), x_BTD], axis=1)
      context_positions_BS = jnp.concatenate([prefix_positions_BP, positions_BT], axis=1)
    q_BTNH, k_BSKH, v_BSKH = self._qkv(x_BTD, context_BSD, positions_BT, context_positions_BS)
    end, length = cache["end"], x_BTD.shape[1]
    write = lambda slots, new: jax.lax.dynamic_update_slice(
      slots, new[:, prefix:].astype(slots.dtype), (0, end, 0, 0)
    )
    cache = dict(
      k_BSKH=write(cache["k_BSKH"], k_BSKH), v_BSKH=write(cache["v_BSKH"], v_BSKH), end=end + length
    )
    t = end + jnp.arange(length)[:, None]
    s = jnp.arange(cache["k_BSKH"].shape[1])[None, :]
    visible_TS = s <= t
    if self.window:
      visible_TS &= t - s < self.window
    visible_TS = jnp.concatenate([jnp.ones((length, prefix), bool), visible_TS], axis=1)
    k_BSKH = jnp.concatenate([k_BSKH[:, :prefix], cache["k_BSKH"]], axis=1)
    v_BSKH = jnp.concatenate([v_BSKH[:, :prefix], cache["v_BSKH"]], axis=1)
    # Empty slots are masked out; an explicit mask is what the "xla" kernel takes everywhere.
    y_BTNH = self._dot(q_BTNH, k_BSKH, v_BSKH, visible_TS, implementation=None)
    return self.output(x_BTD, y_BTNH), cache

  def attend(self, x_BTD: Array, positions_BT: Array) -> Array:
    """Per-head attention outputs (batch, time, heads, head_dim), before w_o."""
    if not self.persistent and (self.use_splash or not self.window):
      q_BTNH, k_BTKH, v_BTKH = self._qkv(x_BTD, x_BTD, positions_BT, positions_BT)
      if self.use_splash:
        return splash.attention(q_BTNH, k_BTKH, v_BTKH, self.window)
      return jax.nn.dot_product_attention(
        q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=self.implementation
      )
    return self.attend_context(
      x_BTD, x_BTD, positions_BT, positions_BT, attention_mask(x_BTD.shape[1], 0, self.window)
    )

  def attend_context(
    self,
    x_BTD: Array,
    context_BSD: Array,
    positions_BT: Array,
    context_positions_BS: Array,
    mask_TS: Array,
  ) -> Array:
    """Queries from x, keys and values from `context` (plus the persistent slots, always
    visible); mask_TS says which context tokens each query sees."""
    q_BTNH, k_BSKH, v_BSKH = self._qkv(x_BTD, context_BSD, positions_BT, context_positions_BS)
    return self._dot(q_BTNH, k_BSKH, v_BSKH, mask_TS, self.implementation)

  def _dot(self, q_BTNH, k_BSKH, v_BSKH, mask_TS, implementation):
    """Masked attention over the keys, with the persistent slots (always visible) in front."""
    if self.persistent:
      slots = (q_BTNH.shape[0], *self.persistent_k.shape)
      k_BSKH = jnp.concatenate(
        [jnp.broadcast_to(self.persistent_k[...].astype(self.dtype), slots), k_BSKH], axis=1
      )
      v_BSKH = jnp.concatenate(
        [jnp.broadcast_to(self.persistent_v[...].astype(self.dtype), slots), v_BSKH], axis=1
      )
      mask_TS = jnp.concatenate([jnp.ones((mask_TS.shape[0], self.persistent), bool), mask_TS], 1)
    return jax.nn.dot_product_attention(
      q_BTNH, k_BSKH, v_BSKH, mask=mask_TS[None, None], implementation=implementation
    )

  def _qkv(self, x_BTD, context_BSD, positions_BT, context_positions_BS):
    x, c = x_BTD.astype(self.dtype), context_BSD.astype(self.dtype)
    q_BTNH = jnp.einsum("btd,dnh->btnh", x, self.w_q[...].astype(self.dtype))
    k_BSKH = jnp.einsum("bsd,dkh->bskh", c, self.w_k[...].astype(self.dtype))
    v_BSKH = jnp.einsum("bsd,dkh->bskh", c, self.w_v[...].astype(self.dtype))
    return (
      rope(q_BTNH, positions_BT, self.rope_theta),
      rope(k_BSKH, context_positions_BS, self.rope_theta),
      v_BSKH,
    )

  def project(self, y_BTNH: Array) -> Array:
    return jnp.einsum("btnh,nhd->btd", y_BTNH, self.w_o[...].astype(self.dtype))


def attention_mask(length: int, persistent: int, window: int) -> Array:
  """(T, persistent + T) bool: persistent slots always, then causal, within `window` if > 0."""
  t = jnp.arange(length)[:, None]
  s = jnp.arange(length)[None, :]
  visible = s <= t
  if window:
    visible &= t - s < window
  return jnp.concatenate([jnp.ones((length, persistent), bool), visible], axis=1)


class GatedAttention(Attention):
  """Attention with a sigmoid output gate (Qiu et al. 2025, used in Qwen3-Next).

  y' = y * sigmoid(x W_g) after scaled-dot-product attention and before w_o,
  from the same normalised x the queries see; one gate per head
  (`model.gate='headwise'`) or per channel ('elementwise', the paper's best).
  The reference code takes the gate logits from extra query-projection
  columns, with no bias; ours is a separate w_gate, the same function, named
  on its own so analyses and checkpoints can find it. `model.gate_bias=True`
  adds a bias b_gate (starting at 0), a departure kept for comparison.
  """

  def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
    super().__init__(spec, rngs=rngs)
    shape = gate_shape(spec)
    axes = ("heads", "head_dim")[: len(shape)]
    pdt = jnp.dtype(spec.param_dtype)
    self.w_gate = param(rngs, (spec.d_model, *shape), ("embed", *axes), spec.init_std, pdt)
    self.b_gate = nnx.Param(jnp.zeros(shape, pdt), logical_axes=axes) if spec.gate_bias else None

  def output(self, x_BTD: Array, y_BTNH: Array) -> Array:
    x = x_BTD.astype(self.dtype)
    # gate: (B, T, N) headwise, (B, T, N, H) elementwise
    gate_logits = jnp.einsum("btd,d...->bt...", x, self.w_gate[...].astype(self.dtype))
    if self.b_gate is not None:
      gate_logits = gate_logits + self.b_gate[...].astype(self.dtype)
    gate = jax.nn.sigmoid(gate_logits)
    if gate.ndim == 3:  # headwise: one scalar per head
      gate = gate[..., None]
    return self.project(y_BTNH * gate)
