"""Run a grid of training runs, one workdir per point, named after its overrides.

    python launch/sweep.py --config configs/demo.py --root workdirs/sched \
        --grid 'model.taper.schedule=uniform,cosine' --grid 'seed=0,1' \
        [--parallel 2] [--dry-run] [-- --config.train.steps=300 ...]
    python launch/sweep.py --preset demo_taper && python -m tlm_jax.report workdirs/demo_taper
    python launch/sweep.py --preset paper_124m [--dry-run] -- --config.data.source=local \
        --config.data.files=CORPUS --config.data.spm_model=M.model   # the 124m table, one GPU
    python launch/sweep.py --preset thirds --root gs://BUCKET/thirds \
        --tpu_vm '--name tlm --zone us-west4-a'   # print launch/tpu_vm.py commands instead

A grid axis is one of
  KEY=V1,V2,...         a config key as after --config. (values as on the command line;
                        commas inside (...) or [...] do not split);
  K1,K2=(A1,A2),(B1,B2) linked keys that change together (e.g. taper start and end);
  taper=NAME,...        a taper preset of tlm_jax.presets.TAPERS (uniform, cosine, reverse,
                        linear, sigmoid, early, middle, late, stepped);
  config=FILE[:ARG],... the config file of each run (instead of --config).
The runs are the cross product of the axes; each goes to ROOT/NAME, NAME being its grid
values joined by '_' (`taper=cosine_seed=0`: no commas, which tools that take a list of
workdirs split on). Overrides after `--` (only --config.KEY=VALUE) apply to every run and
are not part of the name. Every run's config is loaded, overridden and validated before
anything trains, so a typo'd key fails at once, naming the key.

Locally each run is `python -m tlm_jax.train` (log in ROOT/NAME/train.log), one at a
time or --parallel N at once. A run whose latest checkpoint is at train.steps is
skipped; an unfinished one resumes (the trainer picks up its latest checkpoint), so
re-running a sweep only does what is left. ROOT/sweep.json lists the runs, their
overrides and their arguments (for tlm_jax.report and for the record).
Runs that differ only in seed share compiled programs through JAX's persistent
compilation cache in ROOT/.jax_cache (unless JAX_COMPILATION_CACHE_DIR is set).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import itertools
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
from typing import Any

from tlm_jax import cli, presets, taper
from tlm_jax import config as config_lib
from tlm_jax import workdir as workdir_lib
from tlm_jax.errors import ConfigError
from tlm_jax.model import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
# The paper's five ratio pairs are unpublished. Ours: three that meet the budget exactly
# (start + end = 2) at growing strength, and two that model.taper.renormalize (scale)
# brings back to it (2.0/0.5 -> 1.6/0.4, 1.5/1.0 -> 1.2/0.8).
RATIO_PAIRS = "(1.25,0.75),(1.5,0.5),(1.75,0.25),(2.0,0.5),(1.5,1.0)"
BACKBONE_CONFIGS = ",".join(f"configs/tlm_{b}.py:760m" for b in registry.BACKBONES)
PAPER_124M_CONFIGS = ",".join(f"configs/paper_124m.py:{b}" for b in registry.BACKBONES)
# Tokens/s of one H100 at 124m, batch 32 x 1024, bf16, uniform (BENCHMARKS.md, 2026-11-25).
# Hope-attention and Titans are unmeasured there: the estimate takes them at half the
# Transformer's, the throughput target they are held to.
H100_124M_TOKENS_PER_SEC = {"transformer": 443_191, "gated_attention": 409_380}


@dataclasses.dataclass(frozen=True)
class Preset:
  """Blocks of grid axes (each block a cross product; the runs are their union)."""

  help: str
  blocks: tuple[tuple[str, ...], ...]
  config: str | None = None
  root: str | None = None
  overrides: tuple[str, ...] = ()
  tokens_per_sec: dict[str, float] | None = None  # per backbone, for the --dry-run estimate


# thirds, schedules, backbones and paper_124m train 32K-vocabulary models: give them a
# tokenizer after `--` (--config.data.tokenizer=sentencepiece --config.data.spm_model=M.model),
# or train refuses the unused vocabulary rows (data.allow_unused_vocab).
PRESETS = {
  "thirds": Preset(
    "the paper's controlled experiment at 440m: uniform vs 1.5x on one third",
    blocks=(("taper=uniform,early,middle,late",),),
    config="configs/tlm_transformer.py:440m",
  ),
  "schedules": Preset(
    "cosine / linear / sigmoid x five ratio pairs at 440m, plus the uniform baseline",
    blocks=(
      (
        "model.taper.schedule=cosine,linear,sigmoid",
        f"model.taper.start,model.taper.end={RATIO_PAIRS}",
      ),
      ("model.taper.schedule=uniform",),
    ),
    config="configs/tlm_transformer.py:440m",
  ),
  "backbones": Preset(
    "the four backbones at 760m, uniform vs the paper's cosine 1.5 -> 0.5",
    blocks=((f"config={BACKBONE_CONFIGS}", "taper=uniform,cosine"),),
  ),
  "paper_124m": Preset(
    "the paper's table at 124m on one GPU: 4 backbones x uniform/cosine/reverse x 3 seeds",
    blocks=((f"config={PAPER_124M_CONFIGS}", "taper=uniform,cosine,reverse", "seed=0,1,2"),),
    root="workdirs/paper_124m",
    tokens_per_sec=H100_124M_TOKENS_PER_SEC,
  ),
  "demo_taper": Preset(
    "configs/demo.py with uniform / cosine / reverse x 3 seeds, 300 steps each (CPU)",
    blocks=(("taper=uniform,cosine,reverse", "seed=0,1,2"),),
    config="configs/demo.py",
    root="workdirs/demo_taper",
    overrides=(
      "--config.train.steps=300",
      "--config.train.eval_every=100",
      "--config.train.checkpoint_every=300",
    ),
  ),
}


@dataclasses.dataclass(frozen=True)
class Run:
  name: str
  config: str  # configs/NAME.py[:ARG]
  grid: dict[str, str]  # the run's grid values, key -> value as on the command line
  overrides: tuple[str, ...]  # --config.KEY=VALUE, grid first, then the common ones


def split_values(text: str) -> list[str]:
  """Split on commas outside brackets: '(1,2),(3,4)' -> ['(1,2)', '(3,4)']."""
  parts, depth, current = [], 0, ""
  for char in text:
    depth += char in "([{"
    depth -= char in ")]}"
    if char == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += char
  return [p.strip() for p in parts + [current]]


def parse_axis(text: str) -> list[dict[str, str]]:
  """One --grid value -> its options, each {key: value} (pseudo-keys `taper`, `config` kept)."""
  keys_text, sep, values_text = text.partition("=")
  keys = [k.strip() for k in keys_text.split(",")]
  values = split_values(values_text)
  if not sep or not all(keys) or not all(values):
    raise ConfigError(f"--grid {text!r} should be KEY=V1,V2,... or K1,K2=(A1,A2),(B1,B2),...")
  if len(keys) == 1:
    options = [{keys[0]: v} for v in values]
  else:
    options = []
    for value in values:
      items = split_values(value[1:-1]) if value[:1] + value[-1:] == "()" else []
      if len(items) != len(keys):
        raise ConfigError(
          f"--grid {text!r}: value {value!r} needs {len(keys)} entries in parentheses, one "
          f"for each of {keys}"
        )
      options.append(dict(zip(keys, items)))
  if "taper" in keys:
    unknown = [o["taper"] for o in options if o["taper"] not in presets.TAPERS]
    if len(keys) > 1 or unknown:
      raise ConfigError(
        f"--grid {text!r}: taper takes preset names alone, one of {list(presets.TAPERS)}"
      )
  if "config" in keys and len(keys) > 1:
    raise ConfigError(f"--grid {text!r}: config cannot be linked with other keys")
  return options


def axis_keys(text: str) -> tuple[str, ...]:
  return tuple(k.strip() for k in text.partition("=")[0].split(","))


def taper_overrides(name: str) -> dict[str, str]:
  """A taper preset as the model.taper fields it sets."""
  return {f"model.taper.{k}": str(v) for k, v in presets.TAPERS[name].items()}


def short_names(keys: list[str]) -> dict[str, str]:
  """A key's last part names it in workdir names, unless two keys of the sweep share it."""
  last = [k.rsplit(".", 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def name_value(key: str, value: str) -> str:
  """Filesystem-safe: a config file by its stem (and arg), other values with [A-Za-z0-9._+-]."""
  if key == "config":
    path, _, arg = value.partition(":")
    value = os.path.splitext(os.path.basename(path))[0] + (f"-{arg}" if arg else "")
  value = re.sub(r"[^A-Za-z0-9._+-]+", "_", value.replace(" ", "")).strip("_")
  return value or "_"


def expand(blocks: list[list[str]], config: str | None, common: list[str], root: str) -> list[Run]:
  """The runs of every block's cross product, in order; duplicates are an error."""
  parsed = [[parse_axis(a) for a in block] for block in blocks]
  all_keys = [k for block in parsed for axis in block for k in axis[0]]
  short = short_names(list(dict.fromkeys(all_keys)))
  runs, seen = [], {}
  for block in parsed:
    for combo in itertools.product(*block):
      grid = {k: v for option in combo for k, v in option.items()}
      name = "_".join(f"{short[k]}={name_value(k, v)}" for k, v in grid.items()) or "run"
      spec = grid.get("config", config)
      if spec is None:
        raise ConfigError("no config: pass --config FILE[:ARG] (or a config=... grid axis)")
      if "config" in grid and config is not None:
        raise ConfigError("--config and a config=... grid axis both set the config: drop one")
      overrides = []
      for key, value in grid.items():
        if key == "taper":
          overrides += [f"--config.{k}={v}" for k, v in taper_overrides(value).items()]
        elif key != "config":
          overrides.append(f"--config.{key}={value}")
      if name in seen:
        raise ConfigError(f"two runs would share the workdir {os.path.join(root, name)}")
      seen[name] = True
      runs.append(Run(name, spec, grid, tuple(overrides + common)))
  return runs


def resolve(run: Run):
  """The run's config exactly as the trainer will see it, validated (widths included)."""
  config = cli.config_from_args(local_config(run.config), run.overrides)
  config_lib.validate(config)
  taper.widths_from_config(config)
  return config


def latest_step(workdir: str) -> int | None:
  """The newest committed checkpoint step (Orbax renames a finished save to its step number)."""
  folder = os.path.join(workdir, "checkpoints")
  steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
  return max(steps, default=None)


def local_config(spec: str) -> str:
  """A config path as given, or under the repository when it is not found from here (so
  presets work from any folder); tpu_vm commands keep it as given (relative to the repo)."""
  path, sep, arg = spec.partition(":")
  if not os.path.exists(path) and (REPO / path).exists():
    path = str(REPO / path)
  return path + sep + arg


def train_argv(run: Run, workdir: str) -> list[str]:
  config = local_config(run.config)
  return ["-m", "tlm_jax.train", "--config", config, "--workdir", workdir, *run.overrides]


def final_loss(workdir: str) -> str:
  """The last validation loss of a run, for the progress line."""
  losses = [r["loss"] for r in workdir_lib.read_metrics(workdir) if r.get("split") == "validation"]
  return f", validation loss {losses[-1]:.4f}" if losses else ""


def train_one(run: Run, workdir: str, env: dict[str, str]) -> tuple[int, float]:
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    code = subprocess.call(
      [sys.executable, *train_argv(run, workdir)],
      stdout=log,
      stderr=subprocess.STDOUT,
      stdin=subprocess.DEVNULL,
      env=env,
    )
  return code, time.perf_counter() - start


def write_sweep_json(root: str, runs: list[Run]) -> None:
  """Adds (or replaces, by name) this sweep's runs in ROOT/sweep.json."""
  path = os.path.join(root, "sweep.json")
  entries = {}
  if os.path.exists(path):
    with open(path) as f:
      entries = {r["name"]: r for r in json.load(f).get("runs", [])}
  for run in runs:
    entries[run.name] = dict(
      name=run.name, config=run.config, grid=run.grid, overrides=list(run.overrides)
    )
  os.makedirs(root, exist_ok=True)
  with open(path, "w") as f:
    json.dump(dict(runs=list(entries.values())), f, indent=1, sort_keys=True)
    f.write("\n")


def budget_lines(configs: dict[str, Any], tokens_per_sec: dict[str, float] | None) -> list[str]:
  """The sweep's training tokens and, where a preset gives measured throughput, the wall time
  they imply on one GPU (runs one after another)."""
  tokens = {n: c.train.steps * c.train.batch_size * c.train.seq_len for n, c in configs.items()}
  lines = [f"token budget: {sum(tokens.values()) / 1e9:.2f}B tokens in {len(tokens)} run(s)"]
  if tokens_per_sec:
    fallback = tokens_per_sec["transformer"] / 2
    seconds = sum(
      t / tokens_per_sec.get(configs[n].model.backbone, fallback) for n, t in tokens.items()
    )
    unmeasured = sorted({c.model.backbone for c in configs.values()} - set(tokens_per_sec))
    assumed = f" ({', '.join(unmeasured)} assumed at half the Transformer's)" if unmeasured else ""
    lines.append(
      f"one H100, runs in turn: about {seconds / 3600:.1f} h at the measured 124m tokens/s{assumed}"
    )
  return lines


def run_local(runs: list[Run], configs: dict[str, Any], args: argparse.Namespace) -> int:
  """Train what is left; returns the number of failed runs."""
  steps = {name: config.train.steps for name, config in configs.items()}
  todo = []
  for run in runs:
    workdir = os.path.join(args.root, run.name)
    done = latest_step(workdir)
    if done is not None and done >= steps[run.name]:
      print(f"skip {run.name}: finished (step {done} of {steps[run.name]})", flush=True)
      continue
    what = f"resume from step {done}" if done is not None else "train"
    todo.append((run, workdir, what))
    if args.dry_run:
      print(f"# {run.name}: {what}\n{shlex.join(['python', *train_argv(run, workdir)])}")
  if args.dry_run:
    print(f"{len(todo)} run(s) would train; nothing was run")
    print("\n".join(budget_lines(configs, args.tokens_per_sec)))
    return 0
  write_sweep_json(args.root, runs)
  if not todo:
    print("nothing to train: every run is finished", flush=True)
    return 0
  env = dict(os.environ)
  env.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.abspath(os.path.join(args.root, ".jax_cache"))
  )
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  failed = []

  def one(item):
    run, workdir, what = item
    print(f"{run.name}: {what} (log {os.path.join(workdir, 'train.log')})", flush=True)
    code, seconds = train_one(run, workdir, env)
    if code:
      failed.append(run.name)
      print(
        f"{run.name}: FAILED (exit {code}) after {seconds:.0f} s; see its train.log", flush=True
      )
    else:
      print(f"{run.name}: done in {seconds:.0f} s{final_loss(workdir)}", flush=True)

  with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
    list(pool.map(one, todo))
  print(f"trained {len(todo) - len(failed)} of {len(todo)} run(s) in {args.root}", flush=True)
  if failed:
    print(f"failed: {', '.join(sorted(failed))}", file=sys.stderr, flush=True)
  return len(failed)


def print_tpu_vm(runs: list[Run], args: argparse.Namespace) -> None:
  """One launch/tpu_vm.py run command per run; nothing is run."""
  tpu_args = shlex.split(args.tpu_vm)
  print(
    "# launch/tpu_vm.py runs one trainer per VM: start these one after another (or give each "
    "its own --name); `resume` instead of `run` after a preemption"
  )
  for run in runs:
    workdir = f"{args.root.rstrip('/')}/{run.name}"
    print(
      shlex.join(
        [
          "python",
          "launch/tpu_vm.py",
          "run",
          *tpu_args,
          "--config",
          run.config,
          "--workdir",
          workdir,
          "--",
          *run.overrides,
        ]
      )
    )


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0],
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog=__doc__.split("\n\n", 2)[2]
    + "\npresets:\n"
    + "\n".join(f"  {n:<11} {p.help}" for n, p in PRESETS.items()),
  )
  parser.add_argument("--config", help="configs/NAME.py[:ARG] (a preset brings its own)")
  parser.add_argument(
    "--grid", action="append", default=[], metavar="KEY=V1,V2", help="an axis (repeat)"
  )
  parser.add_argument("--preset", choices=sorted(PRESETS), help="a named grid (below)")
  parser.add_argument("--root", help="the sweep's folder: one workdir per run inside")
  parser.add_argument(
    "--dry-run",
    "--dry_run",
    dest="dry_run",
    action="store_true",
    help="validate every run and print its train command; train nothing",
  )
  parser.add_argument("--parallel", type=int, default=1, help="runs trained at once (default 1)")
  parser.add_argument(
    "--tpu_vm",
    metavar="'FLAGS'",
    help="print `launch/tpu_vm.py run FLAGS ...` per run instead of training here "
    "(FLAGS: e.g. '--name tlm --zone us-west4-a')",
  )
  return parser


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[Run], dict[str, Any]]:
  """Parse the command line and resolve every run's config (by run name); raises ConfigError."""
  cut = argv.index("--") if "--" in argv else len(argv)
  args = build_parser().parse_args(argv[:cut])
  common = argv[cut + 1 :]
  bad = [a for a in common if not re.fullmatch(r"--config\.[A-Za-z0-9_.]+=.*", a)]
  if bad:
    raise ConfigError(f"after -- only --config.KEY=VALUE overrides are accepted, not {bad}")
  if args.parallel < 1:
    raise ConfigError(f"--parallel={args.parallel} must be at least 1")
  preset = PRESETS[args.preset] if args.preset else Preset("", blocks=((),))
  args.root = args.root or preset.root
  args.tokens_per_sec = preset.tokens_per_sec
  if not args.root:
    raise ConfigError("--root DIR is required (where the runs' workdirs go)")
  if not args.preset and not args.grid:
    raise ConfigError("give at least one --grid KEY=V1,V2,... (or a --preset)")
  # A --grid axis replaces the preset's axis over the same key(s).
  mine = {axis_keys(a): a for a in args.grid}
  blocks = []
  for block in preset.blocks:
    replaced = [mine.get(axis_keys(a), a) for a in block]
    blocks.append(replaced + [a for a in args.grid if a not in replaced])
  runs = expand(blocks, args.config or preset.config, list(preset.overrides) + common, args.root)
  configs = {}
  for run in runs:
    try:
      configs[run.name] = resolve(run)
    except ConfigError as e:
      raise ConfigError(f"run {run.name}: {e}") from e
  return args, runs, configs


def main(argv: list[str] | None = None) -> int:
  try:
    args, runs, configs = parse(sys.argv[1:] if argv is None else list(argv))
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  print(f"{len(runs)} run(s) in {args.root}", flush=True)
  if args.tpu_vm is not None:
    print_tpu_vm(runs, args)
    return 0
  return 1 if run_local(runs, configs, args) else 0


if __name__ == "__main__":
  sys.exit(main())
