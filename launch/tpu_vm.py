"""Create, set up, run and resume tlm_jax training on a Cloud TPU VM (gcloud underneath).

    T="--name tlm --zone us-west4-a --accelerator_type v5litepod-8 --spot"
    python launch/tpu_vm.py create $T
    python launch/tpu_vm.py setup  $T
    python launch/tpu_vm.py run    $T --config configs/tlm_transformer.py:124m \
        --workdir gs://BUCKET/runs/124m -- --config.train.steps=20000
    python launch/tpu_vm.py logs   $T [--worker 1]
    python launch/tpu_vm.py status $T
    python launch/tpu_vm.py resume $T --config ... --workdir ... -- ...   # after a preemption
    python launch/tpu_vm.py delete $T

Every subcommand takes --dry-run: print the exact commands, one a line (notes
start with '#'), and run nothing. Otherwise each command is echoed ('+ ...')
and run; the first failure stops the script with its exit code.

Choices, and why:
- setup packs the working tree as git sees it (tracked plus untracked files
  that .gitignore doesn't exclude, so uncommitted edits ship; no .venv, no
  .git) into /tmp/tlm_jax_NAME.tar.gz, copies it to every worker with
  `tpu-vm scp --worker=all` (one file, so no --recurse) and unpacks it over
  ~/tlm_jax, then runs `bash launch/setup.sh tpu` there. Files deleted
  locally are not deleted remotely; nothing else in ~/tlm_jax is touched.
- run starts `.venv/bin/python -m tlm_jax.train ...` under nohup on every
  worker, appending to ~/tlm_jax_train.log (the log of a resumed run follows
  the old one) and writing ~/tlm_jax_train.pid. It refuses to start a second
  trainer while one is alive (a TPU can be opened by one process only);
  --restart sends it SIGTERM (the trainer checkpoints and exits), waits, and
  starts again. Peers find each other from the TPU environment
  (distributed.enabled=auto).
- The workdir must be gs:// on a multi-host slice (hosts share nothing else;
  error) and should be on a single host too (a VM disk dies with a preempted
  VM, so resume would start over; warning).
- Default --runtime_version per generation (Cloud TPU docs, "TPU software
  versions"): v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5, v5e
  (v5litepod-N) -> v2-alpha-tpuv5-lite, v4/v3/v2 -> tpu-ubuntu2204-base.
  Those images ship Python 3.10 while the pinned stack needs 3.11+, so
  `setup.sh tpu` installs python3.11 from the image's apt repositories when
  no new enough interpreter is there (or pass `--python` to choose one).
- --queued uses a queued resource named NAME whose node is also NAME, so
  scp/ssh address it as a plain TPU VM. `create --queued` returns once the
  request is queued (watch `status`); resume waits until it is ACTIVE.
- resume: the state says what to do. PREEMPTED/TERMINATED (queued:
  SUSPENDED/SUSPENDING/FAILED) -> delete, create, setup, run; missing ->
  create, setup, run; READY (queued: ACTIVE) -> run (the trainer resumes
  from the workdir's latest checkpoint); anything else -> stop, try later.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TPUS = ["gcloud", "compute", "tpus"]
REMOTE_DIR = "~/tlm_jax"
REMOTE_TARBALL = "tlm_jax.tar.gz"  # in the remote home
LOG = "~/tlm_jax_train.log"
PIDFILE = "~/tlm_jax_train.pid"
PACK_FILES = ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"]
RUNTIMES = {
  "v6e": "v2-alpha-tpuv6e",
  "v5p": "v2-alpha-tpuv5",
  "v5litepod": "v2-alpha-tpuv5-lite",
  "v5e": "v2-alpha-tpuv5-lite",
  "v4": "tpu-ubuntu2204-base",
  "v3": "tpu-ubuntu2204-base",
  "v2": "tpu-ubuntu2204-base",
}
NODE_GONE = ("PREEMPTED", "TERMINATED")
QUEUED_GONE = ("SUSPENDED", "SUSPENDING", "FAILED")
QUEUED_PENDING = ("CREATING", "ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING")
NAME_RE = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")


# ---- commands as lists (pure) ----


def runtime_version(args: argparse.Namespace) -> str:
  if args.runtime_version:
    return args.runtime_version
  generation = args.accelerator_type.rsplit("-", 1)[0]
  if generation not in RUNTIMES:
    raise SystemExit(
      f"error: no default runtime for --accelerator_type={args.accelerator_type}; "
      "pass --runtime_version"
    )
  return RUNTIMES[generation]


def is_multi_host(accelerator_type: str | None) -> bool:
  """More than 8 cores/chips in the suffix (v4-16, v5litepod-16, ...) spans several hosts."""
  m = re.fullmatch(r"[a-z0-9]+-(\d+)", accelerator_type or "")
  return bool(m) and int(m.group(1)) > 8


def _where(args: argparse.Namespace) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def create_cmd(args: argparse.Namespace) -> list[str]:
  if args.queued:
    cmd = [
      *TPUS,
      "queued-resources",
      "create",
      args.name,
      f"--node-id={args.name}",
      *_where(args),
      f"--accelerator-type={args.accelerator_type}",
      f"--runtime-version={runtime_version(args)}",
    ]
  else:
    cmd = [
      *TPUS,
      "tpu-vm",
      "create",
      args.name,
      *_where(args),
      f"--accelerator-type={args.accelerator_type}",
      f"--version={runtime_version(args)}",
    ]
  return cmd + (["--spot"] if args.spot else [])


def delete_cmd(args: argparse.Namespace) -> list[str]:
  if args.queued:
    return [*TPUS, "queued-resources", "delete", args.name, *_where(args), "--force", "--quiet"]
  return [*TPUS, "tpu-vm", "delete", args.name, *_where(args), "--quiet"]


def status_cmd(args: argparse.Namespace) -> list[str]:
  if args.queued:
    return [
      *TPUS,
      "queued-resources",
      "describe",
      args.name,
      *_where(args),
      "--format=value(state.state)",
    ]
  return [*TPUS, "tpu-vm", "describe", args.name, *_where(args), "--format=value(state)"]


def ssh_cmd(args: argparse.Namespace, worker: str, command: str) -> list[str]:
  return [
    *TPUS,
    "tpu-vm",
    "ssh",
    args.name,
    *_where(args),
    f"--worker={worker}",
    f"--command={command}",
  ]


def local_tarball(name: str) -> str:
  return str(pathlib.Path(tempfile.gettempdir()) / f"tlm_jax_{name}.tar.gz")


def scp_cmd(args: argparse.Namespace) -> list[str]:
  return [
    *TPUS,
    "tpu-vm",
    "scp",
    local_tarball(args.name),
    f"{args.name}:{REMOTE_TARBALL}",
    *_where(args),
    "--worker=all",
  ]


def setup_cmd(args: argparse.Namespace) -> list[str]:
  python = f"PYTHON={shlex.quote(args.python)} " if args.python else ""
  return ssh_cmd(
    args,
    "all",
    f"mkdir -p {REMOTE_DIR} && tar -xzf ~/{REMOTE_TARBALL} -C {REMOTE_DIR}"
    f" && cd {REMOTE_DIR} && {python}bash launch/setup.sh tpu",
  )


def train_cmd(args: argparse.Namespace) -> list[str]:
  return [
    ".venv/bin/python",
    "-m",
    "tlm_jax.train",
    "--config",
    args.config,
    "--workdir",
    args.workdir,
    *args.overrides,
  ]


def run_cmd(args: argparse.Namespace) -> list[str]:
  """nohup on every worker; `$!` is the trainer itself (no subshell), so the pid file can guard."""
  alive = f'p=$(cat {PIDFILE} 2>/dev/null); [ -n "$p" ] && grep -qs tlm_jax.train /proc/$p/cmdline'
  if args.restart:
    guard = f"if {alive}; then kill $p; while kill -0 $p 2>/dev/null; do sleep 1; done; fi"
  else:
    guard = (
      f'if {alive}; then echo "tlm_jax.train already running (pid $p); '
      'pass --restart to stop it first" >&2; exit 1; fi'
    )
  start = (
    f"cd {REMOTE_DIR} || exit 1; PYTHONUNBUFFERED=1 nohup {shlex.join(train_cmd(args))}"
    f" >> {LOG} 2>&1 < /dev/null & echo $! > {PIDFILE}"
  )
  return ssh_cmd(args, "all", f"{guard}; {start}")


def logs_cmd(args: argparse.Namespace) -> list[str]:
  return ssh_cmd(args, args.worker, f"tail -n 100 -F {LOG}")


# ---- running them ----


class Shell:
  """Prints each command; runs it unless dry, so dry output is exactly the commands."""

  def __init__(self, dry: bool):
    self.dry = dry

  def note(self, text: str) -> None:
    print(f"# {text}", flush=True)

  def __call__(self, cmd: list[str]) -> None:
    print(("" if self.dry else "+ ") + shlex.join(cmd), flush=True)
    if not self.dry:
      subprocess.run(cmd, check=True)


def pack_repo(tarball: str) -> int:
  """Tar the files git would see now, so uncommitted work ships but .venv and .git don't."""
  names = subprocess.run(PACK_FILES, cwd=REPO, check=True, capture_output=True).stdout.decode()
  files = [f for f in names.split("\0") if f and (REPO / f).is_file()]  # skip deleted files
  with tarfile.open(tarball, "w:gz") as tar:
    for f in files:
      tar.add(REPO / f, arcname=f, recursive=False)
  return len(files)


def setup(args: argparse.Namespace, sh: Shell) -> None:
  tarball = local_tarball(args.name)
  sh.note(
    f"pack the working tree (git ls-files --cached --others --exclude-standard) into {tarball}"
  )
  if not sh.dry:
    sh.note(f"packed {pack_repo(tarball)} files")
  sh(scp_cmd(args))
  sh(setup_cmd(args))


def query_state(args: argparse.Namespace) -> str | None:
  """The VM's (or queued resource's) state; None if it doesn't exist. Other gcloud errors stop."""
  p = subprocess.run(status_cmd(args), capture_output=True, text=True)
  if p.returncode == 0 and p.stdout.strip():
    return p.stdout.strip()
  if "NOT_FOUND" in p.stderr:
    return None
  raise SystemExit(f"error: could not read the state of {args.name}:\n{p.stderr.strip()}")


def wait_active(args: argparse.Namespace, sh: Shell) -> None:
  sh.note(
    f"wait until queued resource {args.name} is ACTIVE (polls `{shlex.join(status_cmd(args))}`)"
  )
  while not sh.dry and (state := query_state(args)) != "ACTIVE":
    if state is None or state in QUEUED_GONE:
      raise SystemExit(f"error: queued resource {args.name} is {state or 'gone'}")
    print(f"  {state}, waiting", flush=True)
    time.sleep(30)


def recreate(args: argparse.Namespace, sh: Shell, delete: bool = True) -> None:
  if delete:
    sh(delete_cmd(args))
  sh(create_cmd(args))
  if args.queued:
    wait_active(args, sh)
  setup(args, sh)
  sh(run_cmd(args))


def resume(args: argparse.Namespace, sh: Shell) -> None:
  ready, gone = ("ACTIVE", QUEUED_GONE) if args.queued else ("READY", NODE_GONE)
  if sh.dry:
    sh.note("resume --dry-run: the state query is not run; it would be:")
    sh(status_cmd(args))
    sh.note(f"if {args.name} is {' or '.join(gone)} (delete is skipped when it is missing):")
    recreate(args, sh)
    sh.note(f"if {args.name} is {ready}:")
    sh(run_cmd(args))
    return
  state = query_state(args)
  sh.note(f"{args.name}: {state or 'missing'}")
  if state == ready:
    sh(run_cmd(args))
  elif state is None or state in gone:
    recreate(args, sh, delete=state is not None)
  elif args.queued and state in QUEUED_PENDING:
    wait_active(args, sh)
    setup(args, sh)
    sh(run_cmd(args))
  else:
    raise SystemExit(
      f"error: {args.name} is {state}; resume acts on {ready}, {', '.join(gone)} "
      "or missing: try again later"
    )


# ---- CLI ----


def build_parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--name", required=True, help="TPU VM name (and queued resource id)")
  common.add_argument("--zone", required=True, help="e.g. us-west4-a")
  common.add_argument("--project", help="default: gcloud's configured project")
  common.add_argument("--accelerator_type", help="e.g. v5litepod-8, v4-32, v6e-16 (create, resume)")
  common.add_argument("--runtime_version", help="default: per TPU generation, see the module doc")
  common.add_argument("--spot", action="store_true", help="Spot VM: cheap, preemptible")
  common.add_argument("--queued", action="store_true", help="go through a queued resource")
  common.add_argument(
    "--dry-run",
    "--dry_run",
    dest="dry_run",
    action="store_true",
    help="print the commands, run nothing",
  )
  setup_flags = argparse.ArgumentParser(add_help=False)
  setup_flags.add_argument("--python", help="interpreter for the VM's .venv (PYTHON for setup.sh)")
  train_flags = argparse.ArgumentParser(add_help=False)
  train_flags.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
  train_flags.add_argument("--workdir", required=True, help="gs://BUCKET/PATH")
  train_flags.add_argument("--restart", action="store_true", help="stop a running trainer first")
  logs_flags = argparse.ArgumentParser(add_help=False)
  logs_flags.add_argument("--worker", default="0", help="worker index (or all)")

  parser = argparse.ArgumentParser(
    description=__doc__.splitlines()[0], epilog="Train overrides (--config.x=y) go after --."
  )
  sub = parser.add_subparsers(dest="command", required=True)
  for name, parents, text in [
    ("create", [], "create the TPU VM (or queued resource)"),
    ("setup", [setup_flags], "copy the repo to every worker, run launch/setup.sh tpu"),
    ("run", [train_flags], "start training on every worker (nohup, ~/tlm_jax_train.log)"),
    ("logs", [logs_flags], "follow a worker's training log"),
    ("status", [], "print the VM's (or queued resource's) state"),
    ("resume", [setup_flags, train_flags], "re-create if preempted, set up, run"),
    ("delete", [], "delete the TPU VM (or queued resource)"),
  ]:
    sub.add_parser(name, parents=[common, *parents], help=text, allow_abbrev=False)
  return parser


def parse(argv: list[str]) -> argparse.Namespace:
  """Parse and check everything up front, so a bad flag fails before any VM is touched."""
  cut = argv.index("--") if "--" in argv else len(argv)
  args = build_parser().parse_args(argv[:cut])
  args.overrides = argv[cut + 1 :]
  if {"--dry-run", "--dry_run"} & set(args.overrides):
    raise SystemExit("error: --dry-run after -- would go to the trainer; put it before --")
  if args.overrides and args.command not in ("run", "resume"):
    raise SystemExit(
      f"error: only run and resume take train overrides after --, not {args.command}"
    )
  if not NAME_RE.fullmatch(args.name):
    raise SystemExit(
      f"error: --name={args.name!r}: lowercase letters, digits and '-', starting with a letter"
    )
  if args.command in ("create", "resume"):
    if not args.accelerator_type:
      raise SystemExit(f"error: {args.command} needs --accelerator_type (e.g. v5litepod-8, v4-32)")
    runtime_version(args)
  if args.command in ("run", "resume"):
    if not (REPO / args.config.split(":", 1)[0]).is_file():
      raise SystemExit(f"error: --config={args.config}: no such file under {REPO}")
    if not args.workdir.startswith("gs://"):
      if is_multi_host(args.accelerator_type):
        raise SystemExit(
          f"error: --workdir={args.workdir}: a multi-host slice "
          f"({args.accelerator_type}) needs a gs:// workdir that all hosts share"
        )
      print(
        f"warning: --workdir={args.workdir} is on the VM's disk: it dies with a preempted "
        "VM (resume then starts over) and multi-host slices can't share it; use gs://",
        file=sys.stderr,
      )
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse(sys.argv[1:] if argv is None else list(argv))
  sh = Shell(args.dry_run)
  try:
    if args.command == "setup":
      setup(args, sh)
    elif args.command == "resume":
      resume(args, sh)
    else:
      sh(
        {
          "create": create_cmd,
          "run": run_cmd,
          "logs": logs_cmd,
          "status": status_cmd,
          "delete": delete_cmd,
        }[args.command](args)
      )
  except subprocess.CalledProcessError as e:
    sys.exit(f"error: exit {e.returncode} from: {shlex.join(e.cmd)}")
  except FileNotFoundError as e:
    hint = " (install the Google Cloud CLI)" if e.filename == "gcloud" else ""
    sys.exit(f"error: {e.filename} not found{hint}")
  except KeyboardInterrupt:
    sys.exit(130)


if __name__ == "__main__":
  main()
