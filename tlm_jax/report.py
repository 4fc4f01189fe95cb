"""Tables and plots over training workdirs: one row per configuration, seeds pooled.

    python -m tlm_jax.report DIR... [--out OUT]

Each DIR is a workdir or a folder of them (a sweep root; its sweep.json names
runs that have not started yet). Runs whose configs differ only in `seed` (and
in bookkeeping that cannot change the numbers, IGNORED, or in sections their
backbone does not read) form one configuration; the model part of that identity
is the per-layer widths, so two taper settings that give the same widths are the
same model. Per configuration: the final validation loss, perplexity and bits
per byte as mean +- sample standard deviation over seeds, the difference of
means against the uniform twin (the configuration with everything equal but
uniform widths) with its standard error sqrt(s1^2/n1 + s2^2/n2) and, where the
twin has runs with the same seeds, the difference paired by seed (same init and
data order, so their shared noise cancels) with its standard error, params and
FLOPs per token (model/costs.py), tokens seen, and zero-shot task scores where
the evaluation CLI wrote tasks_STEP.json. A run that has no metrics, stopped
early or diverged is listed with the reason and left out of the means.

Writes OUT/report.md, OUT/report.json, OUT/val_loss.png, OUT/widths.png and,
when analysis_alignment.json exists in the workdirs, OUT/alignment.png
(default OUT: the first DIR's report/). The same inputs give the same bytes:
keys sorted, runs ordered by name, no timestamps.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tlm_jax import cli, taper
from tlm_jax import config as config_lib
from tlm_jax import workdir as workdir_lib
from tlm_jax.errors import ConfigError
from tlm_jax.model import budget, registry
from tlm_jax.spec import TaperSpec

# Config fields that never change a run's numbers: where files go, how many hosts
# and how the mesh splits the same computation, logging and checkpoint cadence.
IGNORED = (
  "seed",
  "distributed",
  "mesh",
  "data.data_dir",
  "data.worker_count",
  "train.log_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.peak_flops",
  "model.taper",  # stands in as the resolved widths
)
METRICS = ("loss", "perplexity", "bits_per_byte")
# The paper's metric per task (PAPERS.md section 1): acc_norm for HellaSwag and ARC-c.
TASK_METRIC = {"hellaswag": "acc_norm", "arc_challenge": "acc_norm"}
PLOTS = ("val_loss.png", "widths.png", "alignment.png")


# ---------------------------------------------------------------------------
# Reading workdirs.
# ---------------------------------------------------------------------------


def find_workdirs(paths: Sequence[str]) -> list[tuple[str, str]]:
  """(name, path) of every workdir under `paths`, sorted by name.

  A workdir is a folder with config.json or metrics.jsonl; a sweep.json adds the
  runs it lists even when their folders hold nothing yet. Names are relative to
  the DIR given, prefixed with its folder name when there are several DIRs.
  """
  found: dict[str, str] = {}

  def add(name: str, path: str) -> None:
    if name in found and os.path.abspath(found[name]) != os.path.abspath(path):
      raise ConfigError(f"two workdirs would both be called {name!r} ({found[name]}, {path})")
    found[name] = path

  for top in paths:
    if not os.path.isdir(top):
      raise ConfigError(f"{top} is not a folder: give workdirs or sweep roots")
    base = os.path.basename(os.path.abspath(top))
    prefix = f"{base}/" if len(paths) > 1 else ""
    if workdir_lib.is_workdir(top):
      add(base, top)
      continue
    for folder, subdirs, _ in os.walk(top):
      subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d != "report")
      if workdir_lib.is_workdir(folder):
        add(prefix + os.path.relpath(folder, top), folder)
        subdirs[:] = []
    sweep = os.path.join(top, "sweep.json")
    if os.path.exists(sweep):
      with open(sweep) as f:
        listed = json.load(f).get("runs", [])
      for entry in listed:
        if prefix + entry["name"] not in found:
          add(prefix + entry["name"], os.path.join(top, entry["name"]))
  if not found:
    raise ConfigError(f"no workdirs (folders with config.json or metrics.jsonl) in {list(paths)}")
  return sorted(found.items())


def _finite(row: dict[str, Any]) -> bool:
  return all(
    isinstance(row.get(k), (int, float)) and math.isfinite(row[k]) for k in METRICS if k in row
  )


def load_run(name: str, workdir: str) -> dict[str, Any]:
  """One workdir: its config, widths, final validation row, curve, tasks and status."""
  run: dict[str, Any] = dict(name=name, workdir=workdir, status="ok", reason=None)
  if not workdir_lib.has_config(workdir):
    return dict(run, status="left out", reason=f"not started (no {workdir_lib.CONFIG})")
  config = workdir_lib.read_config(workdir)
  run["config"] = config
  run["widths"] = workdir_lib.read_widths(workdir) or taper.widths_from_config(config)
  steps, split = config.train.steps, config.data.eval_split
  rows = workdir_lib.read_metrics(workdir)
  train_rows = workdir_lib.training_rows(workdir)
  evals = workdir_lib.evaluations(workdir, split)
  tokens_per_step = config.train.batch_size * config.train.seq_len
  run["curve"] = [
    (step * tokens_per_step, evals[step]["loss"]) for step in sorted(evals) if _finite(evals[step])
  ]
  last_step = max([r["step"] for r in train_rows] + list(evals), default=0)
  run["step"] = last_step
  run["tokens_seen"] = train_rows[-1]["tokens_seen"] if train_rows else None
  if not rows:
    return dict(run, status="left out", reason=f"no {workdir_lib.METRICS} rows")
  bad = next((r for r in train_rows + list(evals.values()) if not _finite(r)), None)
  if bad is not None:
    return dict(run, status="left out", reason=f"diverged (non-finite loss at step {bad['step']})")
  if last_step < steps:
    # The trainer stops on a non-finite loss without logging it; its log (from the sweep) says so.
    log = os.path.join(workdir, "train.log")
    if os.path.exists(log) and "non-finite" in open(log, errors="replace").read():
      return dict(
        run, status="left out", reason=f"diverged (non-finite loss after step {last_step})"
      )
    return dict(run, status="left out", reason=f"stopped at step {last_step} of {steps}")
  if steps not in evals:
    return dict(run, status="left out", reason=f"no {split} loss at the final step {steps}")
  run["final"] = {k: float(evals[steps][k]) for k in METRICS}
  run["tasks"] = workdir_lib.latest_tasks(workdir) or {}
  alignment = workdir_lib.read_analysis(workdir, "alignment")
  run["alignment"] = None if alignment is None else _mlp_cosines(alignment)
  return run


def _mlp_cosines(result: dict[str, Any]) -> list[float] | None:
  """Per-layer mean cosine of the MLP output with its residual (analysis/alignment.py)."""
  try:
    return [float(layer["mlp"]["cosine_mean"]) for layer in result["layers"]]
  except (KeyError, TypeError):
    return None


# ---------------------------------------------------------------------------
# Grouping and statistics.
# ---------------------------------------------------------------------------


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key in sorted(node.keys()):
    value, path = node[key], f"{prefix}{key}"
    if hasattr(value, "keys"):
      out.update(flatten(value, path + "."))
    else:
      out[path] = list(value) if isinstance(value, tuple) else value
  return out


def identity(config: Any, widths: Sequence[int]) -> dict[str, Any]:
  """What makes a configuration: the config less seed, bookkeeping and the sections its
  backbone does not read; the widths stand for the taper."""
  own = registry.get(config.model.backbone).own_fields
  others = {f for entry in registry.BACKBONES.values() for f in entry.own_fields}
  unread = [f"model.{field}" for field in sorted(others - set(own))]
  flat = flatten(config)
  keep = {
    k: v
    for k, v in flat.items()
    if not any(k == i or k.startswith(i + ".") for i in (*IGNORED, *unread))
  }
  return dict(keep, widths=list(widths))


def _key(ident: dict[str, Any]) -> str:
  return json.dumps(ident, sort_keys=True)


def describe_taper(config: Any) -> str:
  return taper.describe(TaperSpec.from_config(config.model.taper))


def mean_std(values: Sequence[float]) -> dict[str, float | None]:
  """Mean and sample standard deviation (n - 1; None for one value)."""
  n = len(values)
  mean = sum(values) / n
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
  return dict(mean=mean, std=std)


def difference(a: dict[str, Any], b: dict[str, Any], n_a: int, n_b: int) -> dict[str, Any]:
  """a - b of two mean_std results, with the standard error of the difference when both
  have a spread."""
  se = None
  if a["std"] is not None and b["std"] is not None:
    se = math.sqrt(a["std"] ** 2 / n_a + b["std"] ** 2 / n_b)
  return dict(diff=a["mean"] - b["mean"], se=se)


def paired(runs: list[dict[str, Any]], twin_runs: list[dict[str, Any]]) -> dict[str, Any] | None:
  """Validation loss minus the twin's at the same seed (same init and data order), so the
  noise both share cancels: mean and standard error over the pairs."""
  twin = {r["config"].seed: r["final"]["loss"] for r in twin_runs if r["status"] == "ok"}
  ok = [r for r in runs if r["status"] == "ok" and r["config"].seed in twin]
  by_seed = {r["config"].seed: r["final"]["loss"] - twin[r["config"].seed] for r in ok}
  if not by_seed:
    return None
  stats = mean_std([by_seed[s] for s in sorted(by_seed)])
  se = None if stats["std"] is None else stats["std"] / math.sqrt(len(by_seed))
  return dict(
    pairs=len(by_seed), diff=stats["mean"], se=se, by_seed={str(s): by_seed[s] for s in by_seed}
  )


def build(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """The report's content (report.json): configurations, the best one, every run.

  Sets each run's "configuration" (its group's label)."""
  groups: dict[str, dict[str, Any]] = {}
  for run in runs:
    if "config" not in run:
      continue
    ident = identity(run["config"], run["widths"])
    group = groups.setdefault(_key(ident), dict(ident=ident, runs=[], config=run["config"]))
    group["runs"].append(run)
  varying = _varying([g["ident"] for g in groups.values()])
  tapers = {describe_taper(g["config"]) for g in groups.values()}
  labels = [_label(g, varying, len(tapers) > 1) for g in groups.values()]
  for i, group in enumerate(groups.values()):
    # Two groups can look alike only through fields the label leaves out (e.g. taper.tile).
    group["label"] = labels[i] if labels.count(labels[i]) == 1 else f"{labels[i]} #{i}"
    for run in group["runs"]:
      run["configuration"] = group["label"]
    group["summary"] = _summarize(group)
  for group in groups.values():
    c, twin_config = group["summary"], taper.uniform_twin(group["config"])
    uniform = [twin_config.model.mlp_width] * twin_config.model.num_layers
    twin_group = groups.get(_key(identity(twin_config, uniform)))
    twin = twin_group["summary"] if twin_group else None
    c["uniform_twin"] = twin["label"] if twin else None
    c["vs_uniform"] = c["paired_vs_uniform"] = None
    if twin and twin is not c and c["n"] and twin["n"]:
      c["vs_uniform"] = {m: difference(c[m], twin[m], c["n"], twin["n"]) for m in METRICS}
      c["paired_vs_uniform"] = paired(group["runs"], twin_group["runs"])
  # Each uniform configuration first, then the tapered ones that compare against it.
  configurations = sorted(
    (g["summary"] for g in groups.values()),
    key=lambda c: (c["uniform_twin"] or c["label"], c["uniform_twin"] != c["label"], c["label"]),
  )
  ranked = sorted((c for c in configurations if c["n"]), key=lambda c: c["loss"]["mean"])
  best = None
  if ranked:
    best = dict(label=ranked[0]["label"], loss=ranked[0]["loss"], n=ranked[0]["n"])
    if len(ranked) > 1:
      nxt = ranked[1]
      d = difference(nxt["loss"], ranked[0]["loss"], nxt["n"], ranked[0]["n"])
      within = None if d["se"] is None else d["diff"] <= 2 * d["se"]
      best["runner_up"] = dict(label=nxt["label"], **d, within_seed_noise=within)
  return dict(
    configurations=configurations, best=best, varying=varying, runs=[_run_row(r) for r in runs]
  )


def _varying(idents: list[dict[str, Any]]) -> list[str]:
  keys = sorted({k for ident in idents for k in ident} - {"widths"})
  return [k for k in keys if len({json.dumps(i.get(k)) for i in idents}) > 1]


def _label(group: dict[str, Any], varying: list[str], taper_varies: bool) -> str:
  """The fields in which this configuration differs from the others (the taper by name)."""
  last = [k.rsplit(".", 1)[-1] for k in varying]
  parts = [f"taper={describe_taper(group['config'])}"] if taper_varies or not varying else []
  for key, short in zip(varying, last):
    name = short if last.count(short) == 1 else key
    parts.append(f"{name}={group['ident'].get(key)}")
  return ", ".join(parts)


def _summarize(group: dict[str, Any]) -> dict[str, Any]:
  ok = [r for r in group["runs"] if r["status"] == "ok"]
  config, widths = group["config"], group["ident"]["widths"]
  try:
    spec = config_lib.model_spec(config)
    residual, mlp = taper.plan(spec, config_lib.tensor_parallel_size(config))
    params = budget.total_params(spec, mlp, residual)
    flops = budget.flops_per_token(spec, mlp, residual, config.train.seq_len)
  except ConfigError:  # a config.json from another version of the model spec
    params = flops = None
  out = dict(
    label=group["label"],
    taper=describe_taper(config),
    widths=widths,
    params=params,
    flops_per_token=flops,
    n=len(ok),
    runs=sorted(r["name"] for r in ok),
    left_out=sorted(r["name"] for r in group["runs"] if r["status"] != "ok"),
    tokens_seen=ok[0]["tokens_seen"] if ok else None,
    tasks=_tasks(ok),
  )
  for metric in METRICS:
    out[metric] = mean_std([r["final"][metric] for r in ok]) if ok else None
  return out


def _tasks(runs: list[dict[str, Any]]) -> dict[str, Any]:
  """Per task, the paper's metric as mean +- std over the runs that have it."""
  out = {}
  for task in sorted({t for r in runs for t in r["tasks"]}):
    metric = TASK_METRIC.get(task, "acc")
    values = [r["tasks"][task][metric] for r in runs if metric in r["tasks"].get(task, {})]
    if values:
      out[task] = dict(metric=metric, n=len(values), **mean_std(values))
  return out


def _run_row(run: dict[str, Any]) -> dict[str, Any]:
  row = dict(
    name=run["name"],
    configuration=run.get("configuration"),
    status=run["status"],
    reason=run["reason"],
    step=run.get("step"),
  )
  if "final" in run:
    row.update(run["final"])
    row["seed"] = run["config"].seed
  return row


# ---------------------------------------------------------------------------
# Writing: markdown, JSON, PNGs.
# ---------------------------------------------------------------------------


def _pm(stats: dict[str, Any] | None, digits: int) -> str:
  if stats is None:
    return "–"
  if stats["std"] is None:
    return f"{stats['mean']:.{digits}f}"
  return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def _delta(d: dict[str, Any] | None, digits: int) -> str:
  if d is None:
    return "–"
  se = "" if d["se"] is None else f" ± {d['se']:.{digits}f}"
  return f"{d['diff']:+.{digits}f}{se}"


def _int(value: int | None) -> str:
  return "–" if value is None else f"{value:,}"


def markdown(report: dict[str, Any], plots: Sequence[str]) -> str:
  """report.md: the configurations table, the best one, tasks, widths, every run, the plots."""
  confs = report["configurations"]
  n_runs = len(report["runs"])
  lines = [
    "# Report",
    "",
    f"{n_runs} run(s) in {len(confs)} configuration(s); runs that differ only in seed are "
    "pooled. Final validation metrics at train.steps, mean ± sample std over seeds (n = "
    "runs pooled). Δ: difference of means against the uniform twin (same config, uniform "
    "widths) ± its standard error.",
    "",
    "| configuration | n | val loss | perplexity | bits/byte | Δ loss vs uniform | "
    "Δ ppl vs uniform | Δ bits/byte vs uniform | params | FLOPs/token | tokens seen |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  digits = dict(loss=4, perplexity=3, bits_per_byte=4)
  for c in confs:
    if c["uniform_twin"] == c["label"]:
      deltas = ["(uniform)"] * 3
    elif c["vs_uniform"] is None:
      deltas = ["no twin" if c["uniform_twin"] is None else "–"] * 3
    else:
      deltas = [_delta(c["vs_uniform"][m], digits[m]) for m in METRICS]
    n = f"{c['n']}" + (f" (+{len(c['left_out'])} left out)" if c["left_out"] else "")
    values = [_pm(c[m], digits[m]) for m in METRICS]
    counts = [_int(c[k]) for k in ("params", "flops_per_token", "tokens_seen")]
    lines.append("| " + " | ".join([c["label"], n, *values, *deltas, *counts]) + " |")
  lines += ["", _best_line(report["best"]), ""]
  pairs = [c for c in confs if c["paired_vs_uniform"]]
  if pairs:
    lines += [
      "## Paired by seed",
      "",
      "Validation loss minus the uniform twin's at the same seed (same initialisation RNG "
      "and data order, so the noise both runs share cancels): mean ± standard error over "
      "the pairs.",
      "",
      "| configuration | pairs | Δ loss vs uniform | per seed |",
      "|---|---|---|---|",
    ]
    for c in pairs:
      p = c["paired_vs_uniform"]
      seeds = ", ".join(f"{s}: {d:+.4f}" for s, d in sorted(p["by_seed"].items()))
      lines.append(f"| {c['label']} | {p['pairs']} | {_delta(p, 4)} | {seeds} |")
    lines.append("")
  tasks = sorted({(t, v["metric"]) for c in confs for t, v in c["tasks"].items()})
  if tasks:
    lines += [
      "## Zero-shot tasks",
      "",
      "| configuration | " + " | ".join(f"{t} ({m})" for t, m in tasks) + " |",
      "|---" * (len(tasks) + 1) + "|",
    ]
    for c in confs:
      cells = [_pm(c["tasks"].get(t), 4) for t, _ in tasks]
      lines.append(f"| {c['label']} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Widths", "", "| configuration | taper | per-layer MLP widths |", "|---|---|---|"]
  lines += [f"| {c['label']} | {c['taper']} | {' '.join(map(str, c['widths']))} |" for c in confs]
  lines += [
    "",
    "## Runs",
    "",
    "| run | configuration | status | step | val loss |",
    "|---|---|---|---|---|",
  ]
  for r in report["runs"]:
    status = r["status"] if r["reason"] is None else f"{r['status']}: {r['reason']}"
    loss = f"{r['loss']:.4f}" if "loss" in r else "–"
    step = "–" if r["step"] is None else r["step"]
    lines.append(f"| {r['name']} | {r['configuration'] or '–'} | {status} | {step} | {loss} |")
  if plots:
    lines += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
  return "\n".join(lines) + "\n"


def _best_line(best: dict[str, Any] | None) -> str:
  if best is None:
    return "Best: none (no run has a final validation loss)."
  line = f"Best (lowest mean validation loss): **{best['label']}**, "
  line += f"{_pm(best['loss'], 4)} (n={best['n']})."
  nxt = best.get("runner_up")
  if nxt:
    se = "" if nxt["se"] is None else f" ± {nxt['se']:.4f}"
    noise = {
      None: "no seed spread to judge noise",
      True: "within seed noise (difference ≤ 2 standard errors)",
      False: "outside seed noise (difference > 2 standard errors)",
    }[nxt["within_seed_noise"]]
    line += f" Next: {nxt['label']} at {nxt['diff']:+.4f}{se}: {noise}."
  return line


def _figure():
  fig = Figure(figsize=(7, 4.2))
  return fig, fig.subplots()


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=100, metadata={"Software": None})


def plot_loss(groups: list[tuple[str, list[dict[str, Any]]]], path: str) -> None:
  """Validation loss vs tokens, the mean over seeds with a one-std band."""
  fig, ax = _figure()
  for label, runs in groups:
    common = sorted(set.intersection(*(set(t for t, _ in r["curve"]) for r in runs)))
    if not common:
      continue
    stats = [mean_std([dict(r["curve"])[t] for r in runs]) for t in common]
    mean = [s["mean"] for s in stats]
    (line,) = ax.plot(common, mean, marker="o", markersize=3, label=f"{label} (n={len(runs)})")
    if len(runs) > 1:
      low = [s["mean"] - s["std"] for s in stats]
      high = [s["mean"] + s["std"] for s in stats]
      ax.fill_between(common, low, high, color=line.get_color(), alpha=0.2)
  ax.set_xlabel("tokens seen")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("validation loss, mean ± std over seeds")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_widths(confs: list[dict[str, Any]], path: str) -> None:
  fig, ax = _figure()
  for c in confs:
    ax.plot(range(len(c["widths"])), c["widths"], marker="o", label=c["label"])
  ax.set_xlabel("layer")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel("MLP width")
  ax.set_title("per-layer MLP widths")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def plot_alignment(groups: list[tuple[str, list[list[float]]]], path: str) -> None:
  """Per-layer cos(MLP output, residual) from analysis_alignment.json, mean over seeds."""
  fig, ax = _figure()
  for label, series in groups:
    mean = [sum(v) / len(v) for v in zip(*series)]
    ax.plot(range(len(mean)), mean, marker="o", label=f"{label} (n={len(series)})")
  ax.set_xlabel("layer")
  ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  ax.set_ylabel("cos(MLP output, residual)")
  ax.set_title("per-layer residual alignment")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def write(paths: Sequence[str], out: str | None = None) -> dict[str, Any]:
  """Read the workdirs under `paths`, write OUT/report.md, report.json and the PNGs."""
  out = out or os.path.join(paths[0], "report")
  runs = [load_run(name, workdir) for name, workdir in find_workdirs(paths)]
  report = build(runs)
  os.makedirs(out, exist_ok=True)
  ok = [r for r in runs if r["status"] == "ok"]
  groups = [
    (c["label"], [r for r in ok if r["configuration"] == c["label"]])
    for c in report["configurations"]
    if c["n"]
  ]
  plots = []
  if groups:
    plot_loss(groups, os.path.join(out, "val_loss.png"))
    plots.append("val_loss.png")
  if report["configurations"]:
    plot_widths(report["configurations"], os.path.join(out, "widths.png"))
    plots.append("widths.png")
  aligned = [(label, [r["alignment"] for r in rs if r["alignment"]]) for label, rs in groups]
  aligned = [(label, series) for label, series in aligned if series]
  if aligned:
    plot_alignment(aligned, os.path.join(out, "alignment.png"))
    plots.append("alignment.png")
  report["plots"] = plots
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(report, f, indent=1, sort_keys=True)
    f.write("\n")
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write(markdown(report, plots))
  return report


def main(argv: Sequence[str]) -> None:
  paths = list(argv[1:])
  if not paths:
    raise ConfigError("give one or more workdirs or sweep roots: python -m tlm_jax.report DIR...")
  out = _OUT.value or os.path.join(paths[0], "report")
  write(paths, out)
  print(f"wrote {os.path.join(out, 'report.md')}, report.json and PNGs")


if __name__ == "__main__":
  from absl import flags

  _OUT = flags.DEFINE_string("out", None, "Output folder (default: DIR/report for the first DIR).")
  cli.run(main)
