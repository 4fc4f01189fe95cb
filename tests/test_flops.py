"""Analytic FLOPs (costs.py) against XLA's count of the compiled train step, per backbone.

XLA counts what the program executes: every op (norms, softmax, AdamW), and the
masked half of causal attention, which the MFU convention leaves out; so the
comparison adds costs.masked_attention_flops and allows 10% for the rest. The
Titans variants are checked in tests/test_titans.py.
"""

import dataclasses
import json
import subprocess
import sys

import pytest

import helpers
from tlm_jax import config as config_lib
from tlm_jax import taper
from tlm_jax.model import budget, costs

CASES = {
  "transformer": ("tlm_transformer", {}),
  "gated_attention": ("tlm_gated_attention", {"gate": "headwise"}),
  "hope_attention": ("tlm_hope_attention", {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def counted(request):
  """(analytic + masked attention, XLA) FLOPs per token for the tapered and uniform tiny model."""
  name, model_fields = CASES[request.param]
  out = {}
  for arg in ("tiny", "tiny,uniform"):
    cfg = helpers.load_config(name, arg)
    cfg.model.update(model_fields)
    cfg.train.batch_size = 4
    spec, seq_len = config_lib.model_spec(cfg), cfg.train.seq_len
    residual, widths = taper.plan(spec)
    analytic = budget.flops_per_token(spec, widths, residual, seq_len)
    masked = spec.num_layers * costs.masked_attention_flops(spec, seq_len)
    out[arg] = analytic + masked, helpers.xla_flops_per_token(cfg)
  return out


def test_analytic_flops_match_xla_within_10_percent(counted):
  for analytic, xla in counted.values():
    assert abs(xla / analytic - 1) < 0.10, (analytic, xla)


def test_tapered_and_uniform_compile_to_the_same_flops(counted):
  (tapered_analytic, tapered_xla), (uniform_analytic, uniform_xla) = counted.values()
  assert tapered_analytic == uniform_analytic
  assert abs(tapered_xla / uniform_xla - 1) < 0.01


def test_causal_attention_counts_the_visible_half_of_the_square():
  spec = config_lib.model_spec(helpers.load_config("tlm_transformer", "tiny"))
  t, h = 128, spec.num_heads * spec.head_dim
  assert costs.visible_keys(spec, t) == (t + 1) / 2
  full = costs.attention_flops(spec, t) + costs.masked_attention_flops(spec, t)
  assert full - costs.attention_flops(spec, t) == 12 * h * (t - (t + 1) / 2)
  windowed = dataclasses.replace(spec, attention_window=16, persistent_tokens=4)
  assert costs.visible_keys(windowed, t) == (16 * 17 / 2 + (t - 16) * 16) / t + 4


def test_model_cli_reports_params_and_analytic_and_xla_flops():
  result = subprocess.run(
    [sys.executable, "-m", "tlm_jax.model", "--config", "configs/tlm_transformer.py:tiny"]
    + ["--config.train.batch_size=4", "--json"],
    cwd=helpers.REPO,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout)
  assert out["params"] == out["uniform_twin_params"] == out["params_from_costs"]
  assert out["flops_per_token"] < out["xla_flops_per_token"] < 1.25 * out["flops_per_token"]
