"""Generation: cached decoding equals a full forward pass per token, token for token, across
sliding windows, memory chunks and segments; the recurrent mixers' decode in pieces equals
their __call__; ragged batches, seeded sampling, EOS and stop sequences; the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from tlm_jax import config as config_lib
from tlm_jax import generate, restore, state
from tlm_jax.model import hope, titans

PROMPTS = [[0, 5, 9, 200, 3, 7, 100, 20, 30, 40, 50], [0, 1, 2], [0, *range(60, 89)]]
NEW = 40  # the longest row reaches 70 tokens: past the 16-token window four times
# Memories of 3-token chunks (MAC: 6-token segments) after an 8-token prefill that crosses
# chunk and segment boundaries and stops mid-chunk; 24 new tokens take the longest row to 54.
# One layer keeps the two compiles per backbone short (the transformer tests chain layers).
MEMORY_PROMPTS = [PROMPTS[0], PROMPTS[2], [0, 7, 7, 1, 4, 2, 9, 11, 5]]
MEMORY_NEW = 24
TITANS = dict(
  num_layers=1, attention_window=8, persistent_tokens=2, titans=dict(chunk_size=3, segment_size=6)
)
HOPE = dict(
  num_layers=1, attention_window=8, hope=dict(chunk_sizes=(3, 6, 0), inner_lrs=(0.1, 0.1, 0.0))
)
# Larger init than training's keeps random logits far from ties, so float noise cannot flip
# an argmax; windows, GQA (tiny has 2 kv heads for 4 heads) and persistent slots are decoded.
BACKBONES = {
  "transformer": ("tlm_transformer", dict(attention_window=16)),
  "gated_attention": (
    "tlm_gated_attention",
    dict(attention_window=16, persistent_tokens=2, gate="headwise"),
  ),
  "titans_mag": ("tlm_titans", TITANS),
  "titans_mal": ("tlm_titans", dict(TITANS, titans=dict(TITANS["titans"], variant="mal"))),
  "titans_mac": ("tlm_titans", dict(TITANS, titans=dict(TITANS["titans"], variant="mac"))),
  "hope_attention": ("tlm_hope_attention", HOPE),
}


def tiny_config(backbone):
  name, overrides = BACKBONES[backbone]
  config = helpers.load_config(name, "tiny")
  config.model.update(init_std=0.1, **overrides)
  return config


def build(backbone):
  return state.build_model(tiny_config(backbone))


@pytest.fixture(scope="module")
def transformer():
  return build("transformer")


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_cached_greedy_decoding_equals_full_reforward(backbone, transformer):
  model = transformer if backbone == "transformer" else build(backbone)
  memory = backbone.startswith(("titans", "hope"))
  prompts, new = (MEMORY_PROMPTS, MEMORY_NEW) if memory else (PROMPTS, NEW)
  cached = generate.generate_tokens(model, prompts, max_new_tokens=new, eos_id=-1, cached=True)
  full = generate.generate_tokens(model, prompts, max_new_tokens=new, eos_id=-1, cached=False)
  assert [len(c) for c in cached] == [new] * 3
  assert cached == full


# 27, 30 and 13 tokens: the shared 13 go through decode in pieces of 8, 4 and 1 (across
# chunks of 3 and segments of 6), then the longer rows read their prompt a token a step;
# with an 8-token third row, their tokens 8..12 go a token a step too. The buffer lengths of
# the test above, so its loops are reused.
CHUNKED_PROMPTS = [[0, *range(100, 126)], [0, *range(30, 59)], [0, *range(200, 212)]]


def test_prefill_pieces_are_few_sizes_that_add_up():
  assert generate.prefill_pieces(13) == [8, 4, 1] and generate.prefill_pieces(23) == [16, 4, 2, 1]
  assert generate.prefill_pieces(1) == [1] and generate.prefill_pieces(64) == [64]
  assert generate.prefill_pieces(200) == [192, 8]
  sizes = set()
  for length in range(1, 1025):
    pieces = generate.prefill_pieces(length)
    assert sum(pieces) == length and pieces[1:] == sorted(pieces[1:], reverse=True)
    sizes.update(pieces)
  assert sizes == {1, 2, 4, 8, 16, 32, *range(64, 1025, 64)}


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_chunked_prefill_equals_token_by_token_and_full_reforward(backbone, transformer):
  model = transformer if backbone == "transformer" else build(backbone)
  new = MEMORY_NEW if backbone.startswith(("titans", "hope")) else NEW
  kwargs = dict(max_new_tokens=new, eos_id=-1)
  chunked = generate.generate_tokens(model, CHUNKED_PROMPTS, **kwargs)
  full = generate.generate_tokens(model, CHUNKED_PROMPTS, cached=False, **kwargs)
  stepped = generate.generate_tokens(model, [*CHUNKED_PROMPTS[:2], list(range(8))], **kwargs)
  assert [len(c) for c in chunked] == [new] * 3
  assert chunked == full
  assert stepped[:2] == chunked[:2]


# A module's __call__ compiled: eagerly, op by op, a Titans mixer costs several times the CPU.
call = nnx.jit(lambda module, *args: module(*args))


def decode_in_pieces(module, x_BTD, *positions_BT):
  """decode of x 5 tokens, then 1, 1, 1, then 5, 5, from a fresh cache (jitted: two compiles)."""
  cache = module.init_cache(x_BTD.shape[0], x_BTD.shape[1])
  decode = nnx.jit(lambda m, *args: m.decode(*args))
  pieces, start = [], 0
  for size in (5, 1, 1, 1, 5, 5):
    piece = slice(start, start + size)
    y_BTD, cache = decode(module, x_BTD[:, piece], *(p[:, piece] for p in positions_BT), cache)
    pieces.append(y_BTD)
    start += size
  assert start == x_BTD.shape[1]
  return jnp.concatenate(pieces, axis=1)


@pytest.mark.parametrize("variant", ["mal", "mac"])
def test_titans_decode_in_pieces_equals_call(variant):
  spec = config_lib.model_spec(tiny_config(f"titans_{variant}"))
  mixer = titans.Titans(spec, rngs=nnx.Rngs(0))
  x_BTD = jax.random.normal(jax.random.key(1), (2, 18, spec.d_model))
  positions_BT = jnp.broadcast_to(jnp.arange(18), (2, 18))
  want = call(mixer, x_BTD, positions_BT)
  np.testing.assert_allclose(
    decode_in_pieces(mixer, x_BTD, positions_BT), want, rtol=1e-4, atol=1e-5
  )


def test_cms_decode_in_pieces_equals_call():
  spec = config_lib.model_spec(tiny_config("hope_attention"))
  cms = hope.CMS(spec, 128, rngs=nnx.Rngs(0))
  x_BTD = jax.random.normal(jax.random.key(1), (2, 18, spec.d_model))
  np.testing.assert_allclose(decode_in_pieces(cms, x_BTD), call(cms, x_BTD), rtol=1e-4, atol=1e-5)


def test_ragged_batch_equals_one_prompt_at_a_time(transformer):
  # 17 and 30 tokens: 16 prefilled, then the long row reads its prompt while the other samples
  # (and alone, both compile to the same loop).
  prompts = [PROMPTS[2][:17], PROMPTS[2][::-1]]
  batched = generate.generate_tokens(transformer, prompts, max_new_tokens=12, eos_id=-1)
  alone = [
    generate.generate_tokens(transformer, [p], max_new_tokens=12, eos_id=-1) for p in prompts
  ]
  assert batched == [a[0] for a in alone]


def test_sampling_is_reproducible_and_filters(transformer):
  def draw(**kwargs):
    return generate.generate_tokens(transformer, PROMPTS, max_new_tokens=NEW, eos_id=-1, **kwargs)

  sampled = draw(temperature=1.0, top_k=20, top_p=0.9, seed=3)
  assert sampled == draw(temperature=1.0, top_k=20, top_p=0.9, seed=3)
  assert sampled != draw(temperature=1.0, top_k=20, top_p=0.9, seed=4)
  greedy = draw()
  assert sampled != greedy
  assert draw(temperature=1.0, top_k=1, seed=5) == greedy  # one candidate left: the argmax
  assert draw(temperature=1.0, top_p=1e-6, seed=5) == greedy  # nucleus of one token


def test_eos_and_stop_sequences_end_rows(transformer):
  greedy = generate.generate_tokens(transformer, PROMPTS, max_new_tokens=NEW, eos_id=-1)
  eos = greedy[0][5]
  ended = generate.generate_tokens(transformer, PROMPTS, max_new_tokens=NEW, eos_id=eos)
  assert ended[0] == greedy[0][: greedy[0].index(eos)]
  stop = greedy[1][4:6]
  stopped = generate.generate_tokens(
    transformer, PROMPTS, max_new_tokens=NEW, eos_id=-1, stop=[stop, [999, 998]]
  )
  end = next(k for k in range(2, NEW + 1) if greedy[1][k - 2 : k] == stop)
  assert stopped[1] == greedy[1][:end]


@pytest.fixture(scope="module")
def workdir(tiny_workdir):
  return str(tiny_workdir)


def run_generate(*args):
  return subprocess.run(
    [sys.executable, "-m", "tlm_jax.generate", *args],
    cwd=str(helpers.REPO),
    capture_output=True,
    text=True,
    timeout=600,
  )


def test_generate_cli_prints_json_and_cuts_at_stop_strings(workdir):
  restored = restore.latest(workdir)
  (full,) = generate.generate(restored.model, restored.tokenizer, ["the cat"], max_new_tokens=24)
  stop = full[6:8]
  result = run_generate(
    "--workdir", workdir, "--prompt", "the cat", "--max_new_tokens=24", "--stop", stop, "--json"
  )
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert printed == dict(prompt="the cat", completion=full[: full.index(stop)])


def test_generate_cli_fails_in_one_line(workdir, tmp_path):
  (tmp_path / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  result = run_generate("--workdir", str(tmp_path), "--prompt", "hi")
  assert result.returncode == 2 and result.stderr.count("\n") == 1
  assert result.stderr.startswith("error: no checkpoint in")
  helped = run_generate("--help")
  assert "--prompt" in helped.stdout and "--top_p" in helped.stdout  # absl exits 1 on --help
