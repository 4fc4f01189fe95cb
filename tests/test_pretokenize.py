"""Pretokenized windows: the same windows as streaming, rows split by host, exact resume."""

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

import helpers
from tlm_jax.data import pipeline, pretokenize
from tlm_jax.errors import ConfigError


@pytest.fixture(scope="module")
def config(tmp_path_factory):
  config = helpers.load_config("demo")
  config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.train.update(batch_size=8, seq_len=256)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "tlm_jax.data.pretokenize",
      "--config",
      str(helpers.REPO / "configs/demo.py"),
      f"--config.data.data_dir={config.data.data_dir}",
      "--config.train.seq_len=256",
    ],
    cwd=helpers.REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  built = json.loads(result.stdout.strip().splitlines()[-1])
  assert built["cache_dir"] == pretokenize.cache_dir(config)
  assert built["windows"]["validation"] > 0
  config.data.pretokenized = True
  return config


def batches(config, split, n, **kwargs):
  return list(itertools.islice(pipeline.make_iterator(config, split, **kwargs), n))


def test_windows_equal_the_streaming_packer(config):
  packed = batches(config, "validation", 1000, num_epochs=1)
  config.data.pretokenized = False
  try:
    streamed = batches(config, "validation", 1000, num_epochs=1)
  finally:
    config.data.pretokenized = True
  assert len(packed) == len(streamed) > 0
  for a, b in zip(packed, streamed):
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(a["targets"], b["targets"])


def test_hosts_read_disjoint_rows_of_the_same_global_batch(config):
  whole = batches(config, "train", 3)
  halves = [batches(config, "train", 3, process_index=p, process_count=2) for p in (0, 1)]
  for i, batch in enumerate(whole):
    assert batch["inputs"].shape == (8, 256)
    joined = np.concatenate([halves[0][i]["inputs"], halves[1][i]["inputs"]])
    np.testing.assert_array_equal(batch["inputs"], joined)
  assert not np.array_equal(whole[0]["inputs"], batches(config, "validation", 1)[0]["inputs"])


def test_iterator_state_resumes_exactly(config):
  it = pipeline.make_iterator(config, "train")
  next(it)
  state = it.get_state()
  want = [next(it)["inputs"] for _ in range(2)]
  again = pipeline.make_iterator(config, "train")
  again.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(again)["inputs"], w)


def test_a_missing_cache_names_the_command(config):
  other = config.copy_and_resolve_references()
  other.train.seq_len = 128
  with pytest.raises(ConfigError, match="python -m tlm_jax.data.pretokenize"):
    pipeline.make_iterator(other, "train")
