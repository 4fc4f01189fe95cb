"""Every test runs on the CPU with 8 simulated devices, so sharding is exercised."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
# libtpu (installed for AOT TPU compiles) otherwise takes a lock that
# concurrent test subprocesses would fight over.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def run_steps(config, batches, mesh_sizes, devices):
  """Train steps on a mesh of `devices` shaped by `mesh_sizes`: (losses, final state)."""
  from tlm_jax import sharding, train

  config.mesh.update(mesh_sizes)
  _, init_fn, step, _, batch_sh = train.setup(config, sharding.make_mesh(config.mesh, devices))
  state, losses = init_fn(), []
  for batch in batches:
    state, metrics = step(state, sharding.to_global(batch, batch_sh))
    losses.append(float(metrics["loss"]))
  return losses, state
