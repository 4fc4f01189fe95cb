"""Building blocks shared by every backbone: params, RMSNorm, RoPE, SwiGLU.

Params carry `logical_axes` metadata (embed, mlp, heads, ...); the sharding
module maps those names to mesh axes with one rules table.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tlm_jax.spec import ModelSpec

Array = jax.Array


def param(
  rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], std: float, dtype: Any
) -> nnx.Param:
  """A normal(0, std) weight (std 0 gives zeros) tagged with logical axis names.

  Drawn as the first prod(shape) values of a flat draw whose length is the next power of
  two, which gives the same values as a draw of `shape` (threefry draws each element from
  its flat index alone), so built outside jit (state.setup's init) params of nearby sizes
  share one compiled generator: a generator compiled per param was most of the init's
  compile time.
  """
  if std == 0:
    return nnx.Param(jnp.zeros(shape, dtype), logical_axes=axes)
  size = math.prod(shape)
  flat = _scaled_normal(rngs.params(), jnp.asarray(std, dtype), 1 << (size - 1).bit_length())
  return nnx.Param(_first(flat, shape), logical_axes=axes)


@functools.partial(jax.jit, static_argnums=2)
def _scaled_normal(key: Array, std: Array, size: int) -> Array:
  return std * jax.random.normal(key, (size,), std.dtype)


@functools.partial(jax.jit, static_argnums=1)
def _first(flat: Array, shape: tuple[int, ...]) -> Array:
  return flat[: math.prod(shape)].reshape(shape)


def output_std(spec: ModelSpec) -> float:
  """Depth-scaled init for projections that write into the residual stream (GPT-2).

  Like every init std here it does not depend on a layer's MLP width, so under
  the standard init a tapered model's wide early MLPs start with a larger
  output variance than the uniform model's (a confounder `mlp_output_std` can
  remove).
  """
  return spec.init_std / math.sqrt(2 * spec.num_layers)


def mlp_output_std(spec: ModelSpec, width: int) -> float:
  """The std of an MLP's output projection in a layer of MLP width `width`.

  A down projection sums `width` hidden units, so its output variance at init
  grows linearly with the width. model.init="width_scaled" multiplies the
  std by sqrt(mlp_width / width): every layer's MLP output variance at init is
  then that of the uniform model's, whatever the taper (an ablation of the
  init confounder); "standard" keeps output_std for every width.
  """
  scale = math.sqrt(spec.mlp_width / width) if spec.init == "width_scaled" else 1.0
  return output_std(spec) * scale


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, computed in fp32 and returned in the input dtype."""

  def __init__(self, dim: int, eps: float, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
    self.eps = eps

  def __call__(self, x_BTD: Array) -> Array:
    x = x_BTD.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * self.scale[...].astype(jnp.float32)).astype(x_BTD.dtype)


def rope(x_BTNH: Array, positions_BT: Array, theta: float) -> Array:
  """Rotary position embedding, rotating the two halves of each head (Llama/NeoX)."""
  half = x_BTNH.shape[-1] // 2
  freq_H = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BTH = positions_BT[..., None].astype(jnp.float32) * freq_H
  sin, cos = jnp.sin(angle_BTH)[:, :, None, :], jnp.cos(angle_BTH)[:, :, None, :]
  x = x_BTNH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


class SwiGLU(nnx.Module):
  """down(silu(x W_gate) * (x W_up)); `width` is this layer's own MLP width."""

  def __init__(self, spec: ModelSpec, width: int, *, rngs: nnx.Rngs):
    d, pdt = spec.d_model, jnp.dtype(spec.param_dtype)
    self.w_gate = param(rngs, (d, width), ("embed", "mlp"), spec.init_std, pdt)
    self.w_up = param(rngs, (d, width), ("embed", "mlp"), spec.init_std, pdt)
    self.w_down = param(rngs, (width, d), ("mlp", "embed"), mlp_output_std(spec, width), pdt)
    self.dtype = jnp.dtype(spec.dtype)

  def __call__(self, x_BTD: Array) -> Array:
    x = x_BTD.astype(self.dtype)
    gate_BTF = x @ self.w_gate[...].astype(self.dtype)
    up_BTF = x @ self.w_up[...].astype(self.dtype)
    return (jax.nn.silu(gate_BTF) * up_BTF) @ self.w_down[...].astype(self.dtype)
