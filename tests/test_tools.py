"""The AOT TPU compile check and the benchmark, run as users run them."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_module(module, *args):
  result = subprocess.run(
    [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=600
  )
  return result, result.stdout[result.stdout.index("{") :] if "{" in result.stdout else ""


def test_aot_compiles_the_tiny_train_step_for_v5e_2x4():
  result, out = run_module(
    "tlm_jax.aot", "--config", "configs/tlm_transformer.py:tiny", "--topology", "v5e:2x4"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out)
  assert report["chips"] == 8 and report["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert report["fits"] is True
  mem = report["per_device_gib"]
  assert 0 < mem["arguments"] <= mem["peak"] < report["hbm_per_chip_gib"]


def test_aot_says_clearly_when_a_config_does_not_fit():
  result, out = run_module(
    "tlm_jax.aot",
    "--config",
    "configs/tlm_transformer.py:tiny",
    "--topology",
    "v5e:2x4",
    "--config.train.batch_size=262144",
  )
  assert result.returncode != 0
  assert json.loads(out)["fits"] is False
  assert "does NOT fit v5e:2x4" in result.stderr and "RESOURCE_EXHAUSTED" in out


def test_bench_reports_tapered_and_uniform_in_one_run():
  result, out = run_module(
    "tlm_jax.bench",
    "--config",
    "configs/tlm_transformer.py:tiny",
    "--config.train.batch_size=8",
    "--config.train.seq_len=32",
    "--steps",
    "2",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out)
  tapered, uniform = report["tapered"], report["uniform"]
  assert tapered["widths"] == [384, 320, 192, 128] and uniform["widths"] == [256] * 4
  assert tapered["flops_per_token"] == uniform["flops_per_token"]
  for row in (tapered, uniform):
    assert row["compile_s"] > 0 and row["median_step_ms"] > 0 and row["peak_memory_gib"] > 0
  ratio = tapered["tokens_per_sec"] / uniform["tokens_per_sec"]
  assert report["tapered_over_uniform_tokens_per_sec"] == ratio


def test_bench_data_reports_per_host_rates_streamed_and_pretokenized(tmp_path):
  overrides = [
    "--config",
    "configs/demo.py",
    f"--config.data.data_dir={tmp_path}",
    "--config.train.batch_size=8",
  ]
  result, _ = run_module("tlm_jax.data.pretokenize", *overrides, "--splits", "train")
  assert result.returncode == 0, result.stderr[-3000:]
  result, out = run_module("tlm_jax.bench", *overrides, "--data", "--steps", "2", "--hosts", "1,4")
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out)
  rates = report["tokens_per_sec_per_host"]
  assert sorted(rates) == ["pretokenized", "streamed"]
  for mode in rates.values():
    assert sorted(mode) == ["1", "4"] and all(rate > 0 for rate in mode.values())


TINY = ("--config", "configs/tlm_transformer.py:tiny", "--config.model.num_layers=2")


def test_bench_compile_only_reports_the_init_compile_beside_the_step():
  result, out = run_module(
    "tlm_jax.bench",
    *TINY,
    "--compile_only",
    "--config.train.batch_size=8",
    "--config.train.seq_len=32",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out)
  assert report["compile_s"] > 0 and report["init_compile_s"] > 0
  assert report["init_over_step_compile"] == report["init_compile_s"] / report["compile_s"]


def test_bench_decode_reports_prefill_against_forward_and_decoding_rates():
  result, out = run_module(
    "tlm_jax.bench", *TINY, "--decode", "--prompt_len", "40", "--new_tokens", "4", "--steps", "1"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(out)
  assert report["prompt_len"] == 40 and report["prefill_pieces"] == [32, 8]
  prefill, forward = report["prefill_tokens_per_sec"], report["forward_tokens_per_sec"]
  assert report["prefill_over_forward"] == prefill / forward
  b1, b32 = report["decode_tokens_per_sec_b1"], report["decode_tokens_per_sec_b32"]
  assert all(0 < rate < 1e9 for rate in (prefill, forward, b1, b32))
  assert b32 > b1  # 32 rows a step cost less than 32 steps


def test_bench_profile_writes_a_trace_of_bare_steps(tmp_path):
  folder = tmp_path / "profile"
  result, out = run_module(
    "tlm_jax.bench",
    *TINY,
    "--config.train.batch_size=8",
    "--config.train.seq_len=32",
    "--profile",
    str(folder),
    "--steps",
    "2",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  traces = list(folder.rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  assert json.loads(out)["traces"] == [str(traces[0].relative_to(folder))]
