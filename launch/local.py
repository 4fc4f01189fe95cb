"""Run N training processes on this machine as N simulated hosts.

    python launch/local.py --processes 2 --devices_per_process 4 -- \
        --config configs/demo.py --workdir /tmp/run

Each process sees its own CPU devices (XLA's host-platform device count) and
joins the others through jax.distributed on 127.0.0.1, exactly as hosts of a
pod would; process 0 prints, the others log to WORKDIR/process_I.log.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(
  processes: int, devices_per_process: int, train_args: list[str], module: str = "tlm_jax.train"
) -> int:
  """Start the processes, wait for all, return the first non-zero exit code (or 0)."""
  workdir = next((a.split("=", 1)[1] for a in train_args if a.startswith("--workdir=")), None)
  if workdir is None and "--workdir" in train_args:
    workdir = train_args[train_args.index("--workdir") + 1]
  if workdir is None:
    raise SystemExit("pass --workdir DIR after --")
  os.makedirs(workdir, exist_ok=True)
  coordinator = f"127.0.0.1:{free_port()}"
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
  )
  procs = []
  for i in range(processes):
    cmd = [
      sys.executable,
      "-m",
      module,
      *train_args,
      "--config.distributed.enabled=yes",
      f"--config.distributed.coordinator={coordinator}",
      f"--config.distributed.num_processes={processes}",
      f"--config.distributed.process_id={i}",
    ]
    out = None if i == 0 else open(os.path.join(workdir, f"process_{i}.log"), "w")
    procs.append(
      subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    )
  codes = [p.wait() for p in procs]
  return next((c for c in codes if c), 0)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument(
    "train_args", nargs=argparse.REMAINDER, help="arguments for tlm_jax.train, after --"
  )
  args = parser.parse_args()
  train_args = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args
  sys.exit(launch(args.processes, args.devices_per_process, train_args))


if __name__ == "__main__":
  main()
