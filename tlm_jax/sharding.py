"""Device mesh from the config, logical-axis rules, and multi-host start-up.

Params carry logical axis names (see model/layers.py); RULES maps each name
to mesh axes, as MaxText does. The batch is split over data x fsdp.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from tlm_jax.config import MESH_AXES, validate_mesh
from tlm_jax.errors import ConfigError

BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axis (None: replicated).
RULES = {
  "batch": BATCH_AXES,
  "vocab": "tensor",
  "embed": "fsdp",
  "mlp": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": None,
  "norm": None,
  "layers": None,  # the leading axis of a group of stacked layers (model/lm.py, grouped mode)
}


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
  """Axis sizes with one -1 filled in; must multiply to the device count."""
  validate_mesh(mesh_cfg)
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
      raise ConfigError(
        f"mesh {dict(zip(MESH_AXES, sizes))}: {num_devices} devices do not divide by the "
        f"fixed axes ({known}); change mesh.data / mesh.fsdp / mesh.tensor"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
      f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
      f"{num_devices} are present; set mesh.data=-1 to fill, or sizes that multiply "
      f"to {num_devices}"
    )
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return Mesh(
    np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES)
  )


def logical_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for logical axes; a dim that does not divide its mesh axes is replicated."""
  spec = []
  for name, dim in zip(axes, shape):
    mesh_axes = RULES.get(name) if name else None
    size = math.prod(mesh.shape[a] for a in np.atleast_1d(mesh_axes)) if mesh_axes else 1
    spec.append(mesh_axes if mesh_axes and dim % size == 0 else None)
  return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """A NamedSharding per variable from its `logical_axes` metadata (none: replicated)."""

  def one(variable):
    axes = variable.get_metadata().get("logical_axes", (None,) * variable.ndim)
    spec = logical_spec(axes, variable.shape, mesh)
    return variable.replace(NamedSharding(mesh, spec))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def to_global(local_batch: dict[str, np.ndarray], batch_sh: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of the batch -> global arrays sharded over data x fsdp."""
  return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in local_batch.items()}


def check_batch(batch_size: int, mesh: Mesh) -> None:
  parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % parallel:
    raise ConfigError(
      f"train.batch_size={batch_size} is not divisible by data x fsdp = {parallel} "
      f"(mesh {dict(mesh.shape)}); use a multiple of {parallel}"
    )


def initialize_distributed(dist_cfg: Any) -> None:
  """Join a multi-process run. On Cloud TPU VMs jax finds its peers by itself.

  `distributed.enabled`: 'auto' initializes on TPU pods with several hosts,
  'yes' always (with coordinator/num_processes/process_id, or from the
  environment), 'no' never.
  """
  if dist_cfg.enabled == "no":
    return
  if dist_cfg.enabled == "auto":
    if not os.environ.get("TPU_WORKER_HOSTNAMES", "").count(","):
      return
    jax.distributed.initialize()
    return
  kwargs = {}
  if dist_cfg.coordinator:
    kwargs = dict(
      coordinator_address=dist_cfg.coordinator,
      num_processes=dist_cfg.num_processes,
      process_id=dist_cfg.process_id,
    )
  jax.distributed.initialize(**kwargs)
