"""Sweeps, the report and the notebooks, run as users run them.

One tiny sweep (2 schedules x 2 seeds, 2 layers, 4 steps each) is trained once per module and
shared: the re-run, the report and the notebooks all read it.
"""

import importlib.util
import json
import math
import os
import re
import statistics
import subprocess
import sys

import nbclient
import nbformat
import pytest

import helpers
from tlm_jax import report, taper

REPO = str(helpers.REPO)


def load_sweep():
  """launch/sweep.py as a module, registered so its dataclasses can resolve their module."""
  spec = importlib.util.spec_from_file_location("sweep", helpers.REPO / "launch" / "sweep.py")
  module = sys.modules["sweep"] = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sweep_lib = load_sweep()

TINY = [
  "--config.model.num_layers=2",  # compiles faster than the tiny config's 4
  "--config.train.steps=4",
  "--config.train.batch_size=8",
  "--config.train.seq_len=32",
  "--config.train.warmup_steps=1",
  "--config.train.log_every=2",
  "--config.train.eval_every=2",
  "--config.train.eval_batches=1",
  "--config.train.checkpoint_every=4",
]
GRID = ["--grid", "seed=0,1", "--grid", "model.taper.schedule=uniform,cosine"]
NAMES = [f"seed={s}_schedule={t}" for s in (0, 1) for t in ("uniform", "cosine")]
NOTEBOOKS = ("taper_explorer", "compare_runs", "inspect_model")


def run(*args, env=None, timeout=600):
  return subprocess.run(
    [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
  )


def sweep_args(root, data_dir, *extra):
  return [
    "launch/sweep.py",
    "--config",
    "configs/tlm_transformer.py:tiny",
    *GRID,
    "--root",
    str(root),
    "--parallel",
    "2",
    *extra,
    "--",
    f"--config.data.data_dir={data_dir}",
    *TINY,
  ]


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory, builtin_data_dir):
  root = tmp_path_factory.mktemp("sweep")
  data_dir = builtin_data_dir
  # Trainers on one CPU device: the sweep is about orchestration, and one compiles fastest.
  result = run(*sweep_args(root, data_dir), env=helpers.one_device_env())
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  return root, data_dir


def final_losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r["loss"] for r in rows if r.get("split") == "validation" and r["step"] == 4]


def test_a_sweep_trains_every_run_and_a_rerun_trains_nothing(sweep_root):
  root, data_dir = sweep_root
  entries = json.load(open(root / "sweep.json"))["runs"]
  assert sorted(e["name"] for e in entries) == sorted(NAMES)
  for entry in entries:
    assert sweep_lib.latest_step(str(root / entry["name"])) == 4
    assert len(final_losses(root / entry["name"])) == 1
    assert f"--config.data.data_dir={data_dir}" in entry["overrides"]
  cosine = next(e for e in entries if e["name"] == "seed=1_schedule=cosine")
  assert cosine["grid"] == {"seed": "1", "model.taper.schedule": "cosine"}
  before = {n: open(root / n / "metrics.jsonl").read() for n in NAMES}

  again = run(*sweep_args(root, data_dir), env=helpers.one_device_env())
  assert again.returncode == 0, again.stderr[-2000:]
  assert again.stdout.count("finished (step 4 of 4)") == 4
  assert "nothing to train" in again.stdout
  assert {n: open(root / n / "metrics.jsonl").read() for n in NAMES} == before

  # Raising train.steps turns every run into a resume; --dry-run says so and trains nothing.
  dry = run(*sweep_args(root, data_dir, "--dry-run"), "--config.train.steps=6")
  assert dry.returncode == 0, dry.stderr[-2000:]
  assert dry.stdout.count("resume from step 4") == 4
  assert "--config.train.steps=6" in dry.stdout
  assert {n: open(root / n / "metrics.jsonl").read() for n in NAMES} == before


def first_table(md):
  """The rows of the markdown's first table (one per configuration), header excluded."""
  lines = md.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("|---")) + 1
  return lines[start : lines.index("", start)]


def test_report_on_the_sweep_pools_seeds(sweep_root, tmp_path):
  root, _ = sweep_root
  out = tmp_path / "report"
  result = run("-m", "tlm_jax.report", str(root), "--out", str(out))
  assert result.returncode == 0, result.stderr[-2000:]
  md = (out / "report.md").read_text()
  table = first_table(md)
  assert [r.split(" | ")[0] for r in table] == ["| taper=uniform", "| taper=cosine"]
  for row, schedule in zip(table, ("uniform", "cosine")):
    losses = [final_losses(root / f"seed={s}_schedule={schedule}")[0] for s in (0, 1)]
    cells = row.split(" | ")
    assert cells[1] == "2"
    assert cells[2] == f"{statistics.mean(losses):.4f} ± {statistics.stdev(losses):.4f}"
  assert "Best (lowest mean validation loss)" in md
  for name in ("val_loss.png", "widths.png"):
    assert (out / name).stat().st_size > 1000
  data = json.loads((out / "report.json").read_text())
  cosine = next(c for c in data["configurations"] if c["label"] == "taper=cosine")
  assert cosine["widths"] == [384, 128] and cosine["n"] == 2
  assert cosine["params"] == next(c["params"] for c in data["configurations"] if c is not cosine)


def write_workdir(path, arg, seed, evals, train_to=10, tasks=None, alignment=None):
  """A workdir by hand: config.json and widths.json as the trainer writes them, metrics rows
  with the given validation losses per step (no training)."""
  config = helpers.load_config("tlm_transformer", arg)
  config.seed = seed
  config.train.update(steps=10, batch_size=4, seq_len=16)
  path.mkdir(parents=True)
  (path / "config.json").write_text(config.to_json_best_effort(indent=1, sort_keys=True))
  (path / "widths.json").write_text(json.dumps(taper.widths_from_config(config)))
  rows = [dict(step=s, loss=3.0, tokens_seen=s * 64) for s in range(5, train_to + 1, 5)]
  for step, loss in evals.items():
    rows.append(
      dict(step=step, split="validation", loss=loss, perplexity=math.exp(loss), bits_per_byte=loss)
    )
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  if tasks:
    (path / "tasks_10.json").write_text(json.dumps(tasks))
  if alignment:
    layers = [dict(layer=i, mlp=dict(cosine_mean=c)) for i, c in enumerate(alignment)]
    (path / "analysis_alignment.json").write_text(json.dumps(dict(layers=layers)))


def test_report_on_hand_made_workdirs_gives_exact_numbers(tmp_path):
  root = tmp_path / "runs"
  align = [0.1, 0.2, 0.3, 0.4]
  write_workdir(root / "u0", "tiny,uniform", 0, {5: 2.5, 10: 2.0}, alignment=align)
  write_workdir(root / "u1", "tiny,uniform", 1, {5: 2.7, 10: 2.2})
  piqa, hella = [0.6, 0.7], [0.3, 0.5]
  for seed, loss in ((0, 1.9), (1, 2.0)):
    tasks = dict(
      piqa=dict(n=10, acc=piqa[seed]), hellaswag=dict(n=10, acc=0.0, acc_norm=hella[seed])
    )
    write_workdir(root / f"c{seed}", "tiny,cosine", seed, {5: 2.4, 10: loss}, tasks=tasks)
  write_workdir(root / "r0", "tiny,reverse", 0, {5: 2.6, 10: 2.3})
  write_workdir(root / "r1", "tiny,reverse", 1, {5: float("nan"), 10: float("nan")})
  write_workdir(root / "late", "tiny,late", 0, {5: 2.4}, train_to=5)
  (root / "sweep.json").write_text(json.dumps(dict(runs=[dict(name="never")])))

  data = report.write([str(root)], str(tmp_path / "out"))
  confs = {c["label"]: c for c in data["configurations"]}
  assert list(confs) == ["taper=uniform", "taper=cosine", "taper=late", "taper=reverse"]
  u, c, r = confs["taper=uniform"], confs["taper=cosine"], confs["taper=reverse"]
  assert (u["n"], c["n"], r["n"], confs["taper=late"]["n"]) == (2, 2, 1, 0)
  assert u["loss"]["mean"] == pytest.approx(2.1, abs=1e-12)
  assert u["loss"]["std"] == pytest.approx(statistics.stdev([2.0, 2.2]), abs=1e-12)
  assert c["loss"]["mean"] == pytest.approx(1.95, abs=1e-12)
  assert c["loss"]["std"] == pytest.approx(statistics.stdev([1.9, 2.0]), abs=1e-12)
  assert r["loss"] == dict(mean=2.3, std=None)
  assert c["perplexity"]["mean"] == pytest.approx((math.exp(1.9) + math.exp(2.0)) / 2)
  assert c["vs_uniform"]["loss"]["diff"] == pytest.approx(-0.15, abs=1e-12)
  assert c["vs_uniform"]["loss"]["se"] == pytest.approx(math.sqrt(0.02 / 2 + 0.005 / 2))
  assert r["vs_uniform"]["loss"] == dict(diff=pytest.approx(0.2, abs=1e-12), se=None)
  assert u["vs_uniform"] is None and u["uniform_twin"] == "taper=uniform"
  # Paired by seed: 1.9 - 2.0 and 2.0 - 2.2; the diverged reverse seed 1 has no pair.
  pc, pr = c["paired_vs_uniform"], r["paired_vs_uniform"]
  assert (pc["pairs"], pc["diff"]) == (2, pytest.approx(-0.15, abs=1e-12))
  assert pc["se"] == pytest.approx(statistics.stdev([-0.1, -0.2]) / math.sqrt(2))
  assert (pr["pairs"], pr["diff"], pr["se"]) == (1, pytest.approx(0.3, abs=1e-12), None)
  assert c["tasks"]["piqa"] == dict(
    metric="acc", n=2, mean=pytest.approx(0.65), std=pytest.approx(0.0707107)
  )
  assert c["tasks"]["hellaswag"]["metric"] == "acc_norm"
  assert c["tasks"]["hellaswag"]["mean"] == pytest.approx(0.4)
  assert u["params"] == c["params"] == r["params"] and u["widths"] == [256] * 4
  assert c["tokens_seen"] == 640
  assert data["best"]["label"] == "taper=cosine"
  assert data["best"]["runner_up"]["label"] == "taper=uniform"
  assert data["best"]["runner_up"]["within_seed_noise"] is True  # 0.15 <= 2 x 0.112

  reasons = {row["name"]: row["reason"] for row in data["runs"]}
  assert reasons["r1"] == "diverged (non-finite loss at step 5)"
  assert reasons["late"] == "stopped at step 5 of 10"
  assert reasons["never"] == "not started (no config.json)"
  assert reasons["u0"] is None

  md = (tmp_path / "out" / "report.md").read_text()
  assert "| taper=uniform | 2 | 2.1000 ± 0.1414 | " in md
  assert "| taper=cosine | 2 | 1.9500 ± 0.0707 | " in md
  assert "| -0.1500 ± 0.1118 | " in md
  assert "| taper=reverse | 1 (+1 left out) | 2.3000 | " in md and "| +0.2000 | " in md
  assert "| taper=cosine | 0.4000 ± 0.1414 | 0.6500 ± 0.0707 |" in md  # hellaswag, piqa
  assert "| never | – | left out: not started (no config.json) | – | – |" in md
  assert len(first_table(md)) == 4
  assert "within seed noise" in md
  assert "| taper=cosine | 2 | -0.1500 ± 0.0500 | 0: -0.1000, 1: -0.2000 |" in md
  assert data["plots"] == ["val_loss.png", "widths.png", "alignment.png"]

  # Same inputs, same bytes.
  report.write([str(root)], str(tmp_path / "again"))
  for name in ["report.md", "report.json", *data["plots"]]:
    assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_a_typo_in_an_override_key_fails_before_training(tmp_path):
  root = tmp_path / "never"
  base = ["launch/sweep.py", "--config", "configs/tlm_transformer.py:tiny", "--root", str(root)]
  typo_grid = run(*base, "--grid", "model.taper.shedule=uniform,cosine")
  typo_common = run(*base, "--grid", "seed=0,1", "--", "--config.train.stesp=3")
  for result, key, hint, also in [
    (
      typo_grid,
      "model.taper.shedule",
      "model.taper.schedule",
      " or 'config.model.taper.step_schedule'",
    ),
    (typo_common, "train.stesp", "train.steps", ""),
  ]:
    assert result.returncode == 2
    section, typo = key.rsplit(".", 1)
    assert result.stderr.strip().splitlines() == [
      f"error: run {'shedule=uniform' if 'shedule' in key else 'seed=0'}: --config.{key}: "
      f"config.{section} has no field {typo!r}; did you mean 'config.{hint}'{also}?"
    ]
  assert not root.exists()


def test_presets_expand_to_the_papers_grids(capsys):
  def names(*argv):
    return [r.name for r in sweep_lib.parse([*argv, "--root", "/tmp/unused"])[1]]

  assert names("--preset", "thirds") == [
    f"taper={t}" for t in ("uniform", "early", "middle", "late")
  ]
  schedules = names("--preset", "schedules")
  assert len(schedules) == 3 * 5 + 1 and schedules[-1] == "schedule=uniform"
  assert "schedule=sigmoid_start=1.75_end=0.25" in schedules
  demo = names("--preset", "demo_taper", "--grid", "seed=0,1")  # replaces the preset's seeds
  assert demo == [f"taper={t}_seed={s}" for t in ("uniform", "cosine", "reverse") for s in (0, 1)]
  assert len(names("--preset", "backbones")) == 8

  tiny = ",".join(f"configs/tlm_{b}.py:tiny" for b in ("transformer", "titans"))
  argv = ["--preset", "backbones", "--grid", f"config={tiny}", "--root", "gs://b/bb"]
  assert sweep_lib.main([*argv, "--tpu_vm", "--name tlm --zone us-west4-a"]) == 0
  lines = capsys.readouterr().out.splitlines()
  commands = [line for line in lines if line.startswith("python launch/tpu_vm.py run")]
  assert commands[3] == (
    "python launch/tpu_vm.py run --name tlm --zone us-west4-a --config "
    "configs/tlm_titans.py:tiny --workdir gs://b/bb/config=tlm_titans-tiny_taper=cosine -- "
    "--config.model.taper.schedule=cosine --config.model.taper.start=1.5 "
    "--config.model.taper.end=0.5"
  )
  assert len(commands) == 4


def test_the_paper_124m_grid_dry_run_gives_its_budget(capsys, tmp_path):
  argv = ["--preset", "paper_124m", "--root", str(tmp_path / "p"), "--dry-run"]
  assert sweep_lib.main(argv) == 0
  out = capsys.readouterr().out
  assert "36 run(s) would train" in out
  assert "config=paper_124m-titans_taper=reverse_seed=2: train" in out
  # 36 runs x 15,000 steps x 32 x 1024 tokens.
  assert "token budget: 17.69B tokens in 36 run(s)" in out
  hours = float(re.search(r"about ([0-9.]+) h", out).group(1))
  # 18 runs at the measured Transformer/gated rates, 18 at half the Transformer's.
  assert 15 < hours < 19 and "hope_attention, titans assumed" in out
  assert not (tmp_path / "p").exists()


def test_help():
  sweep = run("launch/sweep.py", "--help")
  assert sweep.returncode == 0 and "--grid" in sweep.stdout and "demo_taper" in sweep.stdout
  reported = run("-m", "tlm_jax.report", "--help")
  # absl's --help prints the module doc and flags, then exits 1 (as every tlm_jax CLI does).
  assert reported.returncode in (0, 1) and "--out" in reported.stdout
  assert "python -m tlm_jax.report DIR" in reported.stdout


def test_notebooks_are_stripped_and_execute(sweep_root, monkeypatch):
  root, _ = sweep_root
  monkeypatch.setenv("TLM_RUNS", str(root))
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(REPO, "notebooks", f"{name}.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{name}: strip outputs"
    assert "google.colab" in code[0].source
    client = nbclient.NotebookClient(
      nb,
      timeout=300,
      kernel_name="python3",
      resources={"metadata": {"path": os.path.join(REPO, "notebooks")}},
    )
    client.execute()  # raises CellExecutionError on any failing cell
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert "Traceback" not in text, name
    if name == "inspect_model":
      assert "155,968 parameters (budget.py says 155,968)" in text
