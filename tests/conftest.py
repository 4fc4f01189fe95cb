"""Every test runs on the CPU with 8 simulated devices, so sharding is exercised."""

import os

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
# libtpu (installed for AOT TPU compiles) otherwise takes a lock that
# concurrent test subprocesses would fight over.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
