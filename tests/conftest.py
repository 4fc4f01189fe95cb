"""Every test runs on the CPU with 8 simulated devices, so sharding is exercised.

What is expensive is made once per session and shared: compiled programs (an XLA cache
made for this session, which the trainers and CLIs that tests start read too), the built-in
corpus, and one trained tiny workdir.
"""

import atexit
import os
import shutil
import tempfile

import pytest

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
# libtpu (installed for AOT TPU compiles) otherwise takes a lock that
# concurrent test subprocesses would fight over.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Tests, and the trainers and CLIs they start, compile the same small programs again and
# again. A persistent cache made for this session alone (never one left by an earlier run)
# compiles each once. pytest-xdist workers inherit the first process's folder.
if "PYTEST_XDIST_WORKER" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="tlm_jax_tests_xla_cache_")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


@pytest.fixture(scope="session")
def builtin_data_dir(tmp_path_factory):
  """A TFDS data_dir holding the built-in corpus, prepared once: every test whose config
  reads `data.source=builtin` points `data.data_dir` here."""
  import helpers
  from tlm_jax.data import builders

  path = tmp_path_factory.mktemp("tfds")
  config = helpers.load_config("demo")
  config.data.data_dir = str(path)
  builders.build_if_needed(config.data)
  return path


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """One trained tiny workdir (helpers.train_tiny_workdir) for the evaluate, generate and
  analysis tests. READ-ONLY: a test that writes into a workdir copies it first
  (shutil.copytree to its tmp_path)."""
  import helpers

  return helpers.train_tiny_workdir(tmp_path_factory.mktemp("tiny_workdir"))
