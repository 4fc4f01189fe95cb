"""Training on Parquet, logging to Weights & Biases (offline) and tracing steps with the profiler.

One run repeats the session's tiny workdir (same config, so the same compiled programs from
the session's XLA cache) with its corpus as Parquet, wandb and train.profile_steps on, then
restarts from its checkpoint before the last."""

import glob
import json
import re
import shutil
import struct
import sys
import tomllib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import wandb
from wandb.proto import wandb_internal_pb2

import helpers
from tlm_jax import config as config_lib
from tlm_jax import metrics, train
from tlm_jax import workdir as workdir_lib
from tlm_jax.errors import ConfigError


def wandb_records(path):
  """The protobuf records of an offline run's run-ID.wandb: a LevelDB-style log of 32 KiB
  blocks after a 7-byte header, each record in chunks with a 7-byte header (CRC32, length,
  type: 1 whole, 2 first, 3 middle, 4 last)."""
  with open(path, "rb") as f:
    data = f.read()
  assert data[:4] == b":W&B"
  records, pending, pos = [], b"", 7
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
      pos += 32768 - pos % 32768
      continue
    _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
    pending += data[pos + 7 : pos + 7 + length]
    pos += 7 + length
    if kind in (1, 4):
      records.append(wandb_internal_pb2.Record.FromString(pending))
      pending = b""
  return records


def wandb_runs(workdir):
  """(run id, history rows) of each offline run directory under W/wandb/, oldest first."""
  runs = []
  for file in sorted(glob.glob(str(workdir / "wandb" / "offline-run-*" / "run-*.wandb"))):
    records = wandb_records(file)
    run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
    rows = [
      {
        item.key or "/".join(item.nested_key): json.loads(item.value_json)
        for item in r.history.item
      }
      for r in records
      if r.WhichOneof("record_type") == "history"
    ]
    runs.append((run_id, rows))
  return runs


@pytest.fixture(scope="module")
def parquet_run(tiny_workdir, tmp_path_factory, monkeypatch_module):
  """The tiny workdir's run on its corpus as Parquet, logging every step to an offline wandb
  run and tracing steps 2 and 3; then its last checkpoint is lost and the same command
  resumes from step 10."""
  monkeypatch_module.setenv("WANDB_MODE", "offline")
  monkeypatch_module.setenv("WANDB_SILENT", "true")
  root = tmp_path_factory.mktemp("parquet_run")
  config = workdir_lib.read_config(str(tiny_workdir))
  with open(config.data.files) as f:
    texts = [json.loads(line)["text"] for line in f]
  pq.write_table(pa.table(dict(text=texts)), root / "corpus.parquet", row_group_size=16)
  config.data.update(files=str(root / "corpus.parquet"), data_dir=str(root / "tfds"))
  config.train.update(log_every=1, checkpoint_every=10, profile_steps=(2, 4))
  config.train.wandb.update(project="tlm-tests", name="parquet", tags=("tiny",))
  workdir = root / "run"
  train.train(config, str(workdir))
  first = wandb_runs(workdir)
  shutil.rmtree(workdir / "checkpoints" / str(config.train.steps))
  train.train(config, str(workdir))
  return workdir, first


@pytest.fixture(scope="module")
def monkeypatch_module():
  with pytest.MonkeyPatch.context() as patch:
    yield patch


def test_parquet_trains_like_the_same_jsonl(tiny_workdir, parquet_run):
  workdir, _ = parquet_run
  want = workdir_lib.read_metrics(tiny_workdir)
  got = workdir_lib.read_metrics(workdir)
  steps = helpers.TINY_WORKDIR_STEPS
  assert helpers.train_losses(workdir)[steps] == helpers.train_losses(tiny_workdir)[steps]
  evaluations = [[r for r in rows if r.get("split") == "validation"] for rows in (want, got)]
  assert evaluations[1][-1]["loss"] == evaluations[0][-1]["loss"]


def test_offline_wandb_holds_the_rows_and_a_restart_continues_its_run(parquet_run):
  workdir, first = parquet_run
  run_id = (workdir / workdir_lib.WANDB_RUN_ID).read_text()
  runs = wandb_runs(workdir)
  assert [r for r, _ in runs] == [run_id, run_id]  # a second run directory, the same run
  assert runs[0] == first[0]
  rows = workdir_lib.read_metrics(workdir)
  steps = helpers.TINY_WORKDIR_STEPS
  # metrics.jsonl holds steps 1..12, then 11 and 12 again from the resumed run; wandb too.
  logged = [row for _, run_rows in runs for row in run_rows if "train/loss" in row]
  assert [r["step"] for r in logged] == [r["step"] for r in rows if "split" not in r]
  assert [r["step"] for r in logged] == [*range(1, steps + 1), 11, 12]
  for row, train_row in zip(logged, (r for r in rows if "split" not in r)):
    assert row["train/loss"] == train_row["loss"]
    assert row["train/learning_rate"] == train_row["learning_rate"]
  validation = [row for _, run_rows in runs for row in run_rows if "validation/loss" in row]
  assert [r["validation/loss"] for r in validation] == [
    r["loss"] for r in rows if r.get("split") == "validation"
  ]


def test_profile_steps_write_a_trace(parquet_run):
  workdir, _ = parquet_run
  traces = glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert len(traces) == 1  # steps 2 and 3 of the first run; the resumed one starts at 11
  assert glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*" / "*.trace.json.gz"))


@pytest.mark.parametrize("steps", [(3, 3), (0, 2), (5,), (1, 2, 3)])
def test_bad_profile_steps_are_one_line_errors(steps):
  tcfg = config_lib.base_config().train
  tcfg.profile_steps = steps
  with pytest.raises(ConfigError, match="^" + re.escape(f"train.profile_steps={steps!r}")):
    config_lib.validate_train(tcfg)


def test_wandb_without_an_account_or_the_package_is_a_one_line_error(tmp_path, monkeypatch):
  config = config_lib.base_config()
  config.train.wandb.project = "p"
  monkeypatch.setenv("HOME", str(tmp_path))  # no saved login
  monkeypatch.delenv("WANDB_API_KEY", raising=False)
  monkeypatch.setenv("WANDB_MODE", "online")
  wandb.teardown()  # wandb keeps the settings of an earlier run in this process
  with pytest.raises(ConfigError, match=r"^train\.wandb\.project='p': wandb did not start: "):
    metrics.MetricsWriter(str(tmp_path), config=config)
  monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` does when it is absent
  with pytest.raises(ConfigError, match=r"pip install 'tlm_jax\[wandb\]'"):
    metrics.MetricsWriter(str(tmp_path), config=config)


def test_setup_installs_the_wandb_extra_pin():
  pyproject = tomllib.loads((helpers.REPO / "pyproject.toml").read_text())
  (pin,) = pyproject["project"]["optional-dependencies"]["wandb"]
  assert pin.startswith("wandb==")
  setup = (helpers.REPO / "launch" / "setup.sh").read_text().splitlines()
  assert f'run .venv/bin/python -m pip install -q "{pin}"' in setup
