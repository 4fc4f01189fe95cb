"""Compile the real train step for a Cloud TPU topology on this machine (no TPU needed).

    python -m tlm_jax.aot --config configs/tlm_transformer.py:1.3b --topology v5p:2x2x1

Uses libtpu from PyPI (`pip install jax[tpu]`) and jax.experimental.topologies
to build the config's mesh over the topology's chips, then reports per-device
memory from the compiled program and whether it fits the chip's HBM. A program
that cannot fit fails to compile; that is reported as fits=false.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from tlm_jax import cli, sharding, state

GiB = 2**30
# HBM per chip (bytes) by topology prefix.
HBM_PER_CHIP = {"v4": 32 * GiB, "v5e": 16 * GiB, "v5p": 95 * GiB, "v6e": 32 * GiB}


def compile_for_topology(
  config: ml_collections.ConfigDict, topology: str, chip_config_name: str | None = None
) -> dict:
  """Memory analysis of the train step compiled for `topology`, e.g. 'v5e:2x4'."""
  from jax.experimental import topologies

  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other jax processes may hold libtpu
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  kwargs = dict(chip_config_name=chip_config_name) if chip_config_name else {}
  topo = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  shape = sharding.mesh_shape(config.mesh, len(topo.devices))
  mesh = topologies.make_mesh(topo, shape, sharding.MESH_AXES)
  mesh = jax.sharding.Mesh(
    mesh.devices, sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(shape)
  )
  setup = state.setup(config, mesh)
  tokens = jax.ShapeDtypeStruct(
    (config.train.batch_size, config.train.seq_len), jnp.int32, sharding=setup.batch_sharding
  )
  hbm = next((v for k, v in HBM_PER_CHIP.items() if topology.startswith(k)), None)
  report = dict(
    topology=topology,
    chips=len(topo.devices),
    mesh=dict(zip(sharding.MESH_AXES, shape)),
    hbm_per_chip_gib=hbm and hbm / GiB,
  )
  try:
    compiled = setup.train_step.lower(
      setup.abstract_state, dict(inputs=tokens, targets=tokens)
    ).compile()
  except Exception as e:  # XLA reports an impossible fit as RESOURCE_EXHAUSTED at compile time
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return dict(report, fits=False, error=str(e).splitlines()[0][:500])
  mem = compiled.memory_analysis()
  per_device = dict(
    peak=mem.peak_memory_in_bytes,
    arguments=mem.argument_size_in_bytes,
    outputs=mem.output_size_in_bytes,
    temporaries=mem.temp_size_in_bytes,
    generated_code=mem.generated_code_size_in_bytes,
  )
  return dict(
    report,
    per_device_gib={k: v / GiB for k, v in per_device.items()},
    fits=hbm is None or per_device["peak"] <= hbm,
  )


def main(argv: Sequence[str]) -> None:
  del argv
  report = compile_for_topology(_CONFIG.value, _TOPOLOGY.value, _CHIP_CONFIG.value)
  print(json.dumps(report, indent=1))
  if not report["fits"]:
    sys.exit(
      f"does NOT fit {report['topology']}: shard more (mesh.fsdp=-1, mesh.tensor), "
      "lower train.batch_size, raise train.grad_accum or set model.remat=full"
    )


if __name__ == "__main__":
  from absl import flags

  _CONFIG = cli.config_flag()
  _TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x4", "TPU topology, e.g. v5e:2x4, v5p:2x2x1.")
  _CHIP_CONFIG = flags.DEFINE_string("chip_config_name", None, "e.g. megacore for v4.")
  cli.run(main)
