"""The report's numbers for an X-shaped model: its own params and FLOPs, beside its uniform twin."""

import math
import statistics

import pytest

import helpers
from tlm_jax import config as config_lib
from tlm_jax import report, taper, workdir


def write_finished_run(folder, config, final_loss):
  """A finished workdir written by hand (a 440m model does not train on a CPU): config.json
  and widths.json as the trainer writes them, a training row and the final validation row."""
  config.train.steps = 10
  folder.mkdir(parents=True)
  workdir.write_config(str(folder), config)
  _, widths = taper.plan(config_lib.model_spec(config))
  workdir.write_widths(str(folder), widths)
  workdir.append_metrics(str(folder), dict(step=10, loss=final_loss, tokens_seen=640))
  row = dict(step=10, split="validation", loss=final_loss, perplexity=math.exp(final_loss))
  workdir.append_metrics(str(folder), dict(row, bits_per_byte=final_loss))


def test_xshaped_report_counts_residual_widths_and_compares_with_the_uniform_twin(tmp_path):
  xshaped = helpers.load_config("xformer", "440m")
  losses = {0: (2.0, 2.1), 1: (2.2, 2.25)}  # seed: (X-shaped, uniform twin)
  for seed, (x_loss, twin_loss) in losses.items():
    xshaped.seed = seed
    write_finished_run(
      tmp_path / "runs" / f"x{seed}", xshaped.copy_and_resolve_references(), x_loss
    )
    twin = taper.uniform_twin(xshaped)  # what a user runs: the residual reset too
    write_finished_run(tmp_path / "runs" / f"u{seed}", twin, twin_loss)

  data = report.write([str(tmp_path / "runs")], str(tmp_path / "out"))
  parity = taper.parity_report(helpers.load_config("xformer", "440m"))
  x_conf = next(c for c in data["configurations"] if c["runs"] == ["x0", "x1"])
  twin_conf = next(c for c in data["configurations"] if c["runs"] == ["u0", "u1"])
  assert x_conf["params"] == parity["total_params"] == 439_124_096
  assert x_conf["flops_per_token"] == parity["flops_per_token"]
  assert twin_conf["params"] == parity["uniform_total_params"]
  assert twin_conf["flops_per_token"] == parity["uniform_flops_per_token"]
  assert x_conf["uniform_twin"] == twin_conf["label"] != x_conf["label"]
  gap = statistics.mean([2.0, 2.2]) - statistics.mean([2.1, 2.25])
  assert x_conf["vs_uniform"]["loss"]["diff"] == pytest.approx(gap)
  paired = x_conf["paired_vs_uniform"]
  assert paired["pairs"] == 2 and paired["diff"] == pytest.approx(gap)
  assert paired["by_seed"] == {"0": pytest.approx(-0.1), "1": pytest.approx(-0.05)}
