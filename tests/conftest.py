"""Every test runs on the CPU with 8 simulated devices, so sharding is exercised.

What is expensive is made once per session and shared: compiled programs (an XLA cache
made for this session, which the trainers and CLIs that tests start read too), the built-in
corpus, and one trained tiny workdir.
"""

import atexit
import fcntl
import os
import pathlib
import shutil
import tempfile

import pytest

os.environ["JAX_PLATFORMS"] = "cpu"
# LLVM at level 1 instead of 2 halves the compile time of the small programs tests build
# (most of their CPU time) and runs them no slower.
os.environ["XLA_FLAGS"] = (
  "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=1"
)
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


def made_once(tmp_path_factory, name: str, make) -> pathlib.Path:
  """make(folder) once per session, whatever the number of pytest-xdist workers: the first
  to ask makes it in the temp folder they share, the others wait for it. Returns what make
  returned (a path)."""
  shared = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    shared = shared.parent  # the workers' temp folders are gw0, gw1, ... in the first's
  folder, done = shared / name, shared / f"{name}.done"
  with open(shared / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # held until the file closes
    if not done.exists():
      shutil.rmtree(folder, ignore_errors=True)  # left by a worker that failed midway
      folder.mkdir()
      done.write_text(str(make(folder)))
  return pathlib.Path(done.read_text())


@pytest.fixture(scope="session")
def builtin_data_dir(tmp_path_factory):
  """A TFDS data_dir holding the built-in corpus, prepared once: every test whose config
  reads `data.source=builtin` points `data.data_dir` here."""
  import helpers
  from tlm_jax.data import builders

  def prepare(folder):
    config = helpers.load_config("demo")
    config.data.data_dir = str(folder)
    builders.build_if_needed(config.data)
    return folder

  return made_once(tmp_path_factory, "tfds", prepare)


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """One trained tiny workdir (helpers.train_tiny_workdir) for the evaluate, generate and
  analysis tests. READ-ONLY: a test that writes into a workdir copies it first
  (shutil.copytree to its tmp_path)."""
  import helpers

  return made_once(tmp_path_factory, "tiny_workdir", helpers.train_tiny_workdir)
