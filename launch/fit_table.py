"""Which mesh and remat fit each shipped config on a TPU slice, from AOT compiles on this host.

    python launch/fit_table.py [--topologies v5e:2x4,v5p:2x2x1] [--scales 124m,440m]
        [--backbones transformer,titans] [--tapers cosine,uniform] [--results fit_table.jsonl]
        [--write BENCHMARKS.md] [-- --config.train.seq_len=4096 ...]

For every backbone x scale x (cosine, uniform) config, plus the X-shaped
configs, and every topology (v5e-8 = v5e:2x4, 8 chips of 16 GiB; v5p-8 =
v5p:2x2x1, 4 chips of 95 GiB), the config's own train step (its batch, seq_len
and dtype) is compiled with `tlm_jax.aot.compile_for_topology` under each plan
of PLANS in turn, cheapest first, until one fits the chip's HBM. Each finished
row is appended to --results at once, and rows already there are skipped, so
an interrupted table resumes where it stopped. Overrides after `--` (only
--config.KEY=VALUE) apply to every config and are part of its row's name. --write replaces the table
between the FIT_TABLE markers of that file (or appends it with them).

A fitting 1.3b compile takes minutes on a small host: on a 2-core machine the
whole table is hours, on a TPU VM's host far less.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from tlm_jax import aot, cli, presets
from tlm_jax import config as config_lib
from tlm_jax.errors import ConfigError
from tlm_jax.model import registry

REPO = pathlib.Path(__file__).resolve().parents[1]
SCALES = tuple(s for s in presets.SCALES if s != "tiny")  # the paper's
TOPOLOGIES = ("v5e:2x4", "v5p:2x2x1")
# (mesh, remat) in order of cost: plain data parallelism, then FSDP, then rematerialisation.
PLANS = (
  (dict(data=-1, fsdp=1, tensor=1), "none"),
  (dict(data=1, fsdp=-1, tensor=1), "none"),
  (dict(data=1, fsdp=-1, tensor=1), "dots_no_batch"),
  (dict(data=1, fsdp=-1, tensor=1), "full"),
)
BEGIN, END = "<!-- FIT_TABLE -->", "<!-- /FIT_TABLE -->"


def configs(backbones, scales, tapers=("cosine", "uniform"), overrides=()):
  """(name, config arg) of every shipped config the table covers; overrides end the name."""
  args = [
    f"tlm_{backbone}.py:{scale},{taper}"
    for backbone in backbones
    for scale in scales
    for taper in tapers
  ]
  if "transformer" in backbones and "cosine" in tapers:
    args += [f"xformer.py:{scale}" for scale in scales]
  suffix = "".join(f" {o.removeprefix('--config.')}" for o in overrides)
  return [(arg + suffix, f"configs/{arg}") for arg in args]


def fit(arg: str, topology: str, overrides: tuple[str, ...] = ()) -> dict:
  """The first plan that fits, with its memory; fits=False with the last error if none."""
  tried, hbm = [], None
  for mesh, remat in PLANS:
    config = cli.config_from_args(str(REPO / arg), overrides)
    config.mesh.update(mesh)
    config.model.remat = remat
    start = time.perf_counter()
    try:
      report = aot.compile_for_topology(config, topology)
    except ConfigError as e:  # e.g. a batch that does not split over this plan's mesh
      tried.append(dict(mesh=mesh, remat=remat, fits=False, error=str(e)))
      continue
    tried.append(dict(mesh=report["mesh"], remat=remat, fits=report["fits"]))
    hbm = report["hbm_per_chip_gib"]
    if report["fits"]:
      return dict(
        report,
        remat=remat,
        compile_s=time.perf_counter() - start,
        batch_size=config.train.batch_size,
        seq_len=config.train.seq_len,
        tried=tried,
      )
  return dict(topology=topology, hbm_per_chip_gib=hbm, remat=None, tried=tried)


def markdown(rows: list[dict]) -> str:
  lines = [
    "| config | topology | batch x seq | mesh (data, fsdp, tensor) | remat | peak GiB/chip "
    "| arguments GiB | HBM GiB | compile s |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    if row["remat"] is None:
      mesh, remat, peak, args = "none fits", "", "", ""
    else:
      mesh = ", ".join(str(row["mesh"][a]) for a in config_lib.MESH_AXES)
      remat = row["remat"]
      peak = f"{row['per_device_gib']['peak']:.2f}"
      args = f"{row['per_device_gib']['arguments']:.2f}"
    lines.append(
      f"| {row['config']} | {row['topology']} | {row.get('batch_size', '')} x "
      f"{row.get('seq_len', '')} | {mesh} | {remat} | {peak} | {args} | "
      f"{row['hbm_per_chip_gib'] or 0:.0f} | {row.get('compile_s', 0):.0f} |"
    )
  return "\n".join(lines)


def write_table(path: pathlib.Path, table: str) -> None:
  text = path.read_text() if path.exists() else ""
  block = f"{BEGIN}\n{table}\n{END}"
  if BEGIN in text and END in text:
    head, rest = text.split(BEGIN, 1)
    text = head + block + rest.split(END, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
  path.write_text(text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
  parser.add_argument("--backbones", default=",".join(registry.BACKBONES))
  parser.add_argument("--scales", default=",".join(SCALES))
  parser.add_argument("--tapers", default="cosine,uniform")
  parser.add_argument("--results", default="fit_table.jsonl", help="JSON lines, one per row")
  parser.add_argument("--write", default=None, help="a markdown file to put the table in")
  argv = sys.argv[1:]
  cut = argv.index("--") if "--" in argv else len(argv)
  args, overrides = parser.parse_args(argv[:cut]), tuple(argv[cut + 1 :])
  table_configs = configs(
    args.backbones.split(","), args.scales.split(","), args.tapers.split(","), overrides
  )
  results = pathlib.Path(args.results)
  rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
  done = {(r["config"], r["topology"]) for r in rows}
  for name, arg in table_configs:
    for topology in args.topologies.split(","):
      if (name, topology) in done:
        continue
      row = dict(fit(arg, topology, overrides), config=name)
      rows.append(row)
      with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
      print(markdown([row]).splitlines()[-1], file=sys.stderr, flush=True)
  wanted = {name for name, _ in table_configs}
  table = markdown([r for r in rows if r["config"] in wanted])
  if args.write:
    write_table(pathlib.Path(args.write), table)
  print(table)


if __name__ == "__main__":
  main()
