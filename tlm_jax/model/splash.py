"""Pallas splash attention (TPU): causal or sliding-window, grouped-query, one kernel per shard.

`attention` equals `jax.nn.dot_product_attention(q, k, v, is_causal=True)`
(within `window` if > 0) without materialising the (T, S) logits: the kernel
walks only the key blocks the mask lets through, so memory grows with T, not
T^2, and a window skips the blocks outside it. Splash takes (heads, time,
head_dim) per sequence and no scaling, so the batch is vmapped and q scaled
here. The kernel cannot be auto-partitioned; under a mesh it runs per shard
in a shard_map over the axes tlm_jax.sharding puts batch and heads on.
`interpret=True` runs the same kernel on the CPU (slowly), for tests.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec

from tlm_jax.errors import ConfigError

Array = jax.Array

# Where tlm_jax.sharding.RULES puts activations: batch over data x fsdp, heads over tensor.
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"
LANES = 128  # the kernel tiles time in multiples of this; shorter sequences are padded
MAX_BLOCK = 512


def attention(
  q_BTNH: Array, k_BTKH: Array, v_BTKH: Array, window: int = 0, *, interpret: bool = False
) -> Array:
  """Causal attention (each token sees `window` tokens, itself included, if > 0); query
  head n reads kv head n // (N // K), as jax.nn.dot_product_attention groups them."""
  local = functools.partial(_attention, window=window, interpret=interpret)
  mesh = jax.typeof(q_BTNH).sharding.mesh
  device = None if mesh.empty else mesh.abstract_device
  platform = device.platform if device else jax.default_backend()
  if platform != "tpu" and not interpret:
    raise ConfigError(
      f"model.attention_impl='splash' runs on TPUs only, not {platform}; "
      "use attention_impl='xla' (or 'cudnn' on NVIDIA GPUs)"
    )
  if mesh.empty:
    return local(q_BTNH, k_BTKH, v_BTKH)
  batch_axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  batch_split = math.prod(mesh.shape[a] for a in batch_axes)
  heads_split = mesh.shape.get(HEAD_AXIS, 1)
  spec = PartitionSpec(
    batch_axes if batch_axes and q_BTNH.shape[0] % batch_split == 0 else None,
    None,
    HEAD_AXIS if HEAD_AXIS in mesh.axis_names and k_BTKH.shape[2] % heads_split == 0 else None,
    None,
  )
  # The vma check does not see through pallas_call; each shard's output is its own.
  return jax.shard_map(
    local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False
  )(q_BTNH, k_BTKH, v_BTKH)


def _attention(q_BTNH, k_BTKH, v_BTKH, window, interpret):
  """One shard: pad time to the kernel's tiles (causal: real queries never see the padding)."""
  length, heads, head_dim = q_BTNH.shape[1:]
  padded = -(-length // LANES) * LANES
  kernel = _kernel(padded, heads, window, interpret)

  def one(x_BTXH):  # (B, T, X, H) -> (B, X, T', H), the kernel's layout
    return jnp.pad(x_BTXH, ((0, 0), (0, padded - length), (0, 0), (0, 0))).swapaxes(1, 2)

  q_BNTH = one(q_BTNH * jnp.asarray(head_dim**-0.5, q_BTNH.dtype))
  y_BNTH = jax.vmap(kernel)(q_BNTH, one(k_BTKH), one(v_BTKH))
  return y_BNTH.swapaxes(1, 2)[:, :length]


@functools.cache
def _kernel(length: int, heads: int, window: int, interpret: bool) -> sa.SplashAttentionKernel:
  """The kernel for one shape; its block masks are built on the host, once per shape."""
  shape = (length, length)
  mask = sa.LocalMask(shape, (window - 1, 0), offset=0) if window else sa.CausalMask(shape)
  block = math.gcd(length, MAX_BLOCK)
  sizes = dict.fromkeys(
    ("block_q", "block_kv", "block_kv_compute", "block_q_dkv", "block_kv_dkv")
    + ("block_kv_dkv_compute", "block_q_dq", "block_kv_dq"),
    block,
  )
  # Concrete mask arrays even when first asked for inside a trace, so the cache holds no tracers.
  with jax.ensure_compile_time_eval():
    return sa.make_splash_mha(
      sa.MultiHeadMask([mask] * heads),
      block_sizes=sa.BlockSizes(**sizes),
      head_shards=1,
      q_seq_shards=1,
      interpret=interpret,
    )
