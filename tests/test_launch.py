"""Launch scripts: the exact gcloud commands of launch/tpu_vm.py, and launch/setup.sh's arguments.

Nothing here needs gcloud, a TPU or the network: commands are checked through
--dry-run, and the one real-mode test puts a fake `gcloud` on PATH that copies
files into a temporary HOME and runs the remote scripts there with bash.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from tlm_jax import cli

REPO = pathlib.Path(__file__).resolve().parents[1]
TPUS = "gcloud compute tpus"
BASE = ["--name", "tlm", "--zone", "us-west4-a"]
CONFIG = "configs/tlm_transformer.py:124m"
TRAIN = ["--config", CONFIG, "--workdir", "gs://bkt/runs/a"]
TARBALL = str(pathlib.Path(tempfile.gettempdir()) / "tlm_jax_tlm.tar.gz")
SETUP_LINES = [
  "# pack the working tree (git ls-files --cached --others --exclude-standard) into " + TARBALL,
  f"{TPUS} tpu-vm scp {TARBALL} tlm:tlm_jax.tar.gz --zone=us-west4-a --worker=all",
  f"{TPUS} tpu-vm ssh tlm --zone=us-west4-a --worker=all '--command=mkdir -p ~/tlm_jax && "
  "tar -xzf ~/tlm_jax.tar.gz -C ~/tlm_jax && cd ~/tlm_jax && bash launch/setup.sh tpu'",
]
TRAIN_LINE = (
  "PYTHONUNBUFFERED=1 nohup .venv/bin/python -m tlm_jax.train --config "
  f"{CONFIG} --workdir gs://bkt/runs/a --config.train.steps=10 '--config.x=a b' "
  ">> ~/tlm_jax_train.log 2>&1 < /dev/null & echo $! > ~/tlm_jax_train.pid"
)


@pytest.fixture(scope="session")
def gcloud_stub(tmp_path_factory) -> pathlib.Path:
  bin_dir = tmp_path_factory.mktemp("stub")
  (bin_dir / "gcloud").write_text("#!/bin/sh\necho 'the real gcloud was called' >&2; exit 99\n")
  (bin_dir / "gcloud").chmod(0o755)
  return bin_dir


@pytest.fixture(autouse=True)
def no_real_gcloud(gcloud_stub, monkeypatch):
  """A test that forgets --dry-run must fail here, not reach a real gcloud."""
  monkeypatch.setenv("PATH", f"{gcloud_stub}:{os.environ['PATH']}")


def tpu_vm(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "launch/tpu_vm.py", *args],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=120,
  )


def dry(*args: str) -> list[str]:
  """The printed lines of a successful --dry-run (the flag goes before any `--`)."""
  cut = args.index("--") if "--" in args else len(args)
  p = tpu_vm(*args[:cut], "--dry-run", *args[cut:])
  assert p.returncode == 0, p.stderr
  return p.stdout.splitlines()


def remote_command(line: str) -> tuple[list[str], str]:
  """Split a printed `tpu-vm ssh` line into its gcloud argv and the --command script."""
  argv = shlex.split(line)
  script = next(a for a in argv if a.startswith("--command="))
  return argv, script.removeprefix("--command=")


# ---- create / delete / status / logs ----


@pytest.mark.parametrize(
  "flags, expected",
  [
    (
      ["--accelerator_type", "v5litepod-8"],
      "tpu-vm create tlm --zone=us-west4-a --accelerator-type=v5litepod-8 "
      "--version=v2-alpha-tpuv5-lite",
    ),
    (
      ["--accelerator_type", "v4-32", "--spot", "--project", "proj"],
      "tpu-vm create tlm --zone=us-west4-a --project=proj --accelerator-type=v4-32 "
      "--version=tpu-ubuntu2204-base --spot",
    ),
    (
      ["--accelerator_type", "v6e-8", "--queued"],
      "queued-resources create tlm --node-id=tlm --zone=us-west4-a --accelerator-type=v6e-8 "
      "--runtime-version=v2-alpha-tpuv6e",
    ),
    (
      ["--accelerator_type", "v5p-16", "--queued", "--spot"],
      "queued-resources create tlm --node-id=tlm --zone=us-west4-a --accelerator-type=v5p-16 "
      "--runtime-version=v2-alpha-tpuv5 --spot",
    ),
    (
      ["--accelerator_type", "tpu7x-8", "--runtime_version", "my-runtime"],
      "tpu-vm create tlm --zone=us-west4-a --accelerator-type=tpu7x-8 --version=my-runtime",
    ),
  ],
)
def test_create(flags, expected):
  assert dry("create", *BASE, *flags) == [f"{TPUS} {expected}"]


@pytest.mark.parametrize(
  "sub, flags, expected",
  [
    ("delete", [], "tpu-vm delete tlm --zone=us-west4-a --quiet"),
    ("delete", ["--queued"], "queued-resources delete tlm --zone=us-west4-a --force --quiet"),
    ("status", [], "tpu-vm describe tlm --zone=us-west4-a '--format=value(state)'"),
    (
      "status",
      ["--queued", "--project", "p"],
      "queued-resources describe tlm --zone=us-west4-a --project=p '--format=value(state.state)'",
    ),
    (
      "logs",
      [],
      "tpu-vm ssh tlm --zone=us-west4-a --worker=0 '--command=tail -n 100 -F ~/tlm_jax_train.log'",
    ),
    (
      "logs",
      ["--worker", "3"],
      "tpu-vm ssh tlm --zone=us-west4-a --worker=3 '--command=tail -n 100 -F ~/tlm_jax_train.log'",
    ),
  ],
)
def test_single_commands(sub, flags, expected):
  assert dry(sub, *BASE, *flags) == [f"{TPUS} {expected}"]


# ---- setup / run / resume ----


def test_setup_copies_to_and_installs_on_all_workers():
  assert dry("setup", *BASE) == SETUP_LINES
  _, script = remote_command(dry("setup", *BASE, "--python", "python3.11")[-1])
  assert script.endswith("&& PYTHON=python3.11 bash launch/setup.sh tpu")


def test_run_starts_the_train_command_on_all_workers():
  [line] = dry("run", *BASE, *TRAIN, "--", "--config.train.steps=10", "--config.x=a b")
  argv, script = remote_command(line)
  assert argv[:8] == shlex.split(f"{TPUS} tpu-vm ssh tlm --zone=us-west4-a --worker=all")
  assert len(argv) == 9
  guard, start = script.split("; cd ~/tlm_jax || exit 1; ")
  assert start == TRAIN_LINE
  assert "already running" in guard and "kill" not in guard
  [line] = dry("run", *BASE, *TRAIN, "--restart", "--", "--config.train.steps=10", "--config.x=a b")
  guard, start = remote_command(line)[1].split("; cd ~/tlm_jax || exit 1; ")
  assert "kill $p" in guard and start == TRAIN_LINE


def test_resume_prints_both_branches_in_order():
  lines = dry(
    "resume",
    *BASE,
    "--accelerator_type",
    "v4-32",
    "--spot",
    *TRAIN,
    "--",
    "--config.train.steps=10",
    "--config.x=a b",
  )
  [query, preempted, ready] = [
    i for i, l in enumerate(lines) if l.startswith("# ") and not l.startswith("# pack")
  ]
  assert "dry-run" in lines[query] and "PREEMPTED or TERMINATED" in lines[preempted]
  assert lines[ready] == "# if tlm is READY:"
  assert lines[query + 1] == f"{TPUS} tpu-vm describe tlm --zone=us-west4-a '--format=value(state)'"
  sequence = lines[preempted + 1 : ready]
  assert sequence[:2] == [
    f"{TPUS} tpu-vm delete tlm --zone=us-west4-a --quiet",
    f"{TPUS} tpu-vm create tlm --zone=us-west4-a --accelerator-type=v4-32 "
    "--version=tpu-ubuntu2204-base --spot",
  ]
  assert sequence[2:5] == SETUP_LINES
  assert len(sequence) == 6 and remote_command(sequence[5])[1].endswith(TRAIN_LINE)
  assert lines[ready + 1 :] == [sequence[5]]


def test_resume_queued_deletes_with_force_and_waits_for_active():
  lines = dry("resume", *BASE, "--accelerator_type", "v5litepod-16", "--queued", "--spot", *TRAIN)
  commands = [l for l in lines if not l.startswith("#")]
  assert commands[:3] == [
    f"{TPUS} queued-resources describe tlm --zone=us-west4-a '--format=value(state.state)'",
    f"{TPUS} queued-resources delete tlm --zone=us-west4-a --force --quiet",
    f"{TPUS} queued-resources create tlm --node-id=tlm --zone=us-west4-a "
    "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot",
  ]
  assert any("SUSPENDED" in l for l in lines) and "# if tlm is ACTIVE:" in lines
  wait = next(i for i, l in enumerate(lines) if "is ACTIVE (polls" in l)
  assert lines[wait - 1] == commands[2] and lines[wait + 1].startswith("# pack")


# ---- validation ----


@pytest.mark.parametrize(
  "args, flag",
  [
    (["create", "--zone", "z", "--accelerator_type", "v4-8"], "--name"),
    (["status", "--name", "n"], "--zone"),
    (["create", "--name", "n", "--zone", "z"], "--accelerator_type"),
    (["resume", "--name", "n", "--zone", "z", *TRAIN], "--accelerator_type"),
    (["run", "--name", "n", "--zone", "z", "--workdir", "gs://b/r"], "--config"),
    (["run", "--name", "n", "--zone", "z", "--config", CONFIG], "--workdir"),
    (
      ["create", "--name", "n", "--zone", "z", "--accelerator_type", "tpu7x-8"],
      "--runtime_version",
    ),
    (
      ["run", "--name", "n", "--zone", "z", "--config", "configs/nope.py", "--workdir", "gs://b"],
      "--config=configs/nope.py",
    ),
    (["status", "--name", "My_TPU", "--zone", "z"], "--name"),
    (["status", "--name", "n", "--zone", "z", "--", "--config.x=1"], "after --"),
  ],
)
def test_bad_flags_fail_naming_the_flag(args, flag):
  p = tpu_vm(*args, "--dry-run")
  assert p.returncode != 0 and flag in p.stderr and not p.stdout


def test_workdir_must_be_gcs_on_multi_host():
  local = ["--config", CONFIG, "--workdir", "/tmp/run"]
  p = tpu_vm("run", *BASE, "--accelerator_type", "v4-32", *local, "--dry-run")
  assert p.returncode != 0 and "gs://" in p.stderr and not p.stdout
  p = tpu_vm("run", *BASE, "--accelerator_type", "v5litepod-8", *local, "--dry-run")
  assert p.returncode == 0 and "warning" in p.stderr and "--workdir /tmp/run" in p.stdout
  p = tpu_vm("run", *BASE, "--accelerator_type", "v4-32", *TRAIN, "--dry-run")
  assert p.returncode == 0 and not p.stderr


# ---- setup.sh ----


def pinned_jax() -> str:
  return re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)


@pytest.mark.parametrize("arg, extra", [("tpu", "tpu"), ("cuda", "cuda13"), (None, None)])
def test_setup_sh_installs_the_accelerator_jax(arg, extra):
  p = subprocess.run(
    ["bash", "launch/setup.sh", *([arg] if arg else [])],
    cwd=REPO,
    env=dict(os.environ, SETUP_DRY_RUN="1"),
    capture_output=True,
    text=True,
  )
  assert p.returncode == 0, p.stderr
  lines = p.stdout.splitlines()
  assert ".venv/bin/python -m pip install -q -r requirements.txt" in lines
  jax = [l for l in lines if "jax[" in l]
  if extra is None:
    assert not jax
  else:
    assert jax == [f".venv/bin/python -m pip install -q jax[{extra}]=={pinned_jax()}"]
    assert lines.index(jax[0]) > lines.index(
      ".venv/bin/python -m pip install -q -r requirements.txt"
    )


def test_setup_sh_rejects_unknown_accelerator():
  p = subprocess.run(
    ["bash", "launch/setup.sh", "rocm"],
    cwd=REPO,
    capture_output=True,
    text=True,
    env=dict(os.environ, SETUP_DRY_RUN="1"),
  )
  assert p.returncode == 2 and "usage" in p.stderr and not p.stdout


# ---- real mode against a fake gcloud ----

FAKE_GCLOUD = """\
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
  f.write(json.dumps(args) + "\\n")
verb = args[3]
if verb == "describe":
  state = os.environ["FAKE_STATE"]
  if state == "MISSING":
    sys.exit(print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: tlm", file=sys.stderr))
  print(state)
elif verb == "scp":
  shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
elif verb == "ssh":
  script = next(a for a in args if a.startswith("--command=")).split("=", 1)[1]
  env = dict(os.environ, SETUP_DRY_RUN="1")  # never install anything here
  sys.exit(subprocess.run(["bash", "-c", script], env=env).returncode)
"""
FAKE_TRAINER = """\
#!/bin/bash
echo "fake train $*"
sleep 30 &
trap 'echo stopped; kill $!; exit 0' TERM
wait
"""


@pytest.fixture
def fake_vm(tmp_path):
  """A HOME for the 'VM', a fake gcloud on PATH and a trainer stand-in; kills what it started."""
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "tlm_jax" / ".venv" / "bin").mkdir(parents=True)
  bin_dir.mkdir()
  gcloud = bin_dir / "gcloud"
  gcloud.write_text(f"#!{sys.executable}\n{FAKE_GCLOUD}")
  trainer = home / "tlm_jax" / ".venv" / "bin" / "python"
  trainer.write_text(FAKE_TRAINER)
  for f in (gcloud, trainer):
    f.chmod(0o755)
  env = dict(
    os.environ,
    HOME=str(home),
    PATH=f"{bin_dir}:{os.environ['PATH']}",
    FAKE_GCLOUD_LOG=str(tmp_path / "gcloud.jsonl"),
    FAKE_STATE="READY",
  )
  env.pop("SETUP_DRY_RUN", None)
  started: list[int] = []
  yield home, env, started
  for pid in started:
    try:
      os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
      pass


def trainer_pid(home: pathlib.Path, started: list[int]) -> int:
  """Wait for the trainer's pid file and first log line; remember the pid for cleanup."""
  for _ in range(100):
    pidfile, log = home / "tlm_jax_train.pid", home / "tlm_jax_train.log"
    if pidfile.exists() and log.exists() and "fake train" in log.read_text():
      pid = int(pidfile.read_text())
      started.append(pid)
      return pid
    time.sleep(0.05)
  raise AssertionError("the trainer did not start")


def alive(pid: int) -> bool:
  return (
    pathlib.Path(f"/proc/{pid}").exists()
    and b"tlm_jax.train" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
  )


def stop(pid: int) -> None:
  os.kill(pid, signal.SIGTERM)
  for _ in range(100):
    if not alive(pid):
      return
    time.sleep(0.05)
  raise AssertionError(f"trainer {pid} did not stop")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the run guard reads /proc")
def test_real_mode_setup_run_resume(fake_vm):
  home, env, started = fake_vm
  name = f"t{os.getpid()}"
  flags = ["--name", name, "--zone", "z", "--accelerator_type", "v5litepod-8", *TRAIN]
  log = pathlib.Path(env["FAKE_GCLOUD_LOG"])
  try:
    p = tpu_vm("setup", "--name", name, "--zone", "z", env=env)
    assert p.returncode == 0, p.stderr
    assert (home / "tlm_jax" / "launch" / "tpu_vm.py").exists()  # the working tree arrived
    assert f"install -q jax[tpu]=={pinned_jax()}" in p.stdout  # setup.sh ran (dry) on the 'VM'
    assert "+ gcloud compute tpus tpu-vm scp" in p.stdout

    p = tpu_vm("run", *flags[:4], *TRAIN, "--", "--config.train.steps=10", env=env)
    assert p.returncode == 0, p.stderr
    first = trainer_pid(home, started)
    assert alive(first)
    assert (
      "--workdir gs://bkt/runs/a --config.train.steps=10"
      in (home / "tlm_jax_train.log").read_text()
    )

    p = tpu_vm("run", *flags[:4], *TRAIN, env=env)  # one trainer per TPU
    assert p.returncode != 0 and "already running" in p.stderr and alive(first)

    log.write_text("")
    p = tpu_vm("resume", *flags, "--restart", env=env)  # READY: SIGTERM, wait, start again
    assert p.returncode == 0, p.stderr
    verbs = [json.loads(l)[3] for l in log.read_text().splitlines()]
    assert verbs == ["describe", "ssh"] and not alive(first)
    second = trainer_pid(home, started)
    assert second != first and alive(second)
    assert "stopped" in (home / "tlm_jax_train.log").read_text()  # appended, not truncated

    for state, expected in [
      ("PREEMPTED", ["describe", "delete", "create", "scp", "ssh", "ssh"]),
      ("MISSING", ["describe", "create", "scp", "ssh", "ssh"]),
    ]:
      stop(trainer_pid(home, started))  # preemption took the trainer with it
      log.write_text("")
      p = tpu_vm("resume", *flags, env=dict(env, FAKE_STATE=state))
      assert p.returncode == 0, p.stderr
      assert [json.loads(l)[3] for l in log.read_text().splitlines()] == expected
      assert alive(trainer_pid(home, started))

    p = tpu_vm("resume", *flags, env=dict(env, FAKE_STATE="CREATING"))
    assert p.returncode != 0 and "CREATING" in p.stderr
  finally:
    pathlib.Path(tempfile.gettempdir(), f"tlm_jax_{name}.tar.gz").unlink(missing_ok=True)


def test_fit_table_rows_carry_the_overrides_they_were_compiled_with():
  spec = importlib.util.spec_from_file_location("fit_table", REPO / "launch" / "fit_table.py")
  fit_table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fit_table)
  overrides = ("--config.train.seq_len=4096", "--config.model.attention_impl=splash")
  rows = fit_table.configs(["transformer", "titans"], ["440m"], ["cosine"], overrides)
  suffix = " train.seq_len=4096 model.attention_impl=splash"
  assert [name for name, _ in rows] == [
    "tlm_transformer.py:440m,cosine" + suffix,
    "tlm_titans.py:440m,cosine" + suffix,
    "xformer.py:440m" + suffix,
  ]
  config = cli.config_from_args(str(REPO / rows[1][1]), overrides)
  assert (config.train.seq_len, config.model.attention_impl) == (4096, "splash")
  assert config.model.backbone == "titans"
