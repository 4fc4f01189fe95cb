"""Text from a trained model: prefill, then cached decoding in one jitted loop.

    python -m tlm_jax.generate --workdir DIR --prompt TEXT [--max_new_tokens 64 \
        --temperature 0 --top_k 0 --top_p 1 --seed 0 --stop STR] [--json]

`generate` (text in and out) and `generate_tokens` (ids) run on any model, e.g.
`restore.latest(workdir).model` on the mesh its checkpoint was restored onto.
Temperature 0 is greedy; otherwise top-k, then top-p (nucleus) filtering, then
a draw whose key depends only on the seed, the row and the position.

Prompts of different lengths share one time index. The tokens every prompt has
(up to the shortest prompt's length) are prefilled through the model's decode
in pieces: the length's bucket (a power of two up to 64, then a multiple of
64), then the rest's binary digits, largest first, so few piece sizes (each
compiled once) serve every prompt length, and the recurrent memories run their
chunk closed forms over whole pieces. After that one jitted loop takes a token
per step: each row reads its own prompt token while it has one and its
sampled token after. No row is padded on the left, so positions and the
recurrent memories (whose chunks count from the first token) are those of a
single prompt. A row stops at EOS, after max_new_tokens, or once it ends with a
stop sequence; the loop stops when every row has. Every backbone decodes with
a cache (attention's keys and values, the recurrent memories' state);
`cached=False` runs a full forward pass per token instead, the reference the
cached path is tested against. `prefill` and `decode` are the two phases
`generate_tokens` runs (the benchmark times them apart).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlm_jax import cli, restore
from tlm_jax.data.tokenizers import Tokenizer
from tlm_jax.errors import ConfigError
from tlm_jax.model import lm

Array = jax.Array
_BUCKET = 64  # prefill buckets and buffer lengths are multiples of this (above 64)


def sample(
  logits_BV: Array, keys_B: Array, temperature: Array, top_k: Array, top_p: Array
) -> Array:
  """Next tokens: argmax at temperature 0, else a draw from the top-k / top-p filtered
  softmax(logits / temperature) (top_k 0 and top_p 1 filter nothing)."""
  scaled_BV = logits_BV / jnp.maximum(temperature, 1e-6)
  sorted_BV = -jnp.sort(-scaled_BV, axis=-1)
  kth_B1 = jnp.take(sorted_BV, jnp.clip(top_k - 1, 0, sorted_BV.shape[-1] - 1), axis=-1)[:, None]
  cut_k = (top_k > 0) & (sorted_BV < kth_B1)
  sorted_BV = jnp.where(cut_k, -jnp.inf, sorted_BV)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV  # mass of the more likely tokens
  floor_B1 = jnp.min(jnp.where(before_BV < top_p, sorted_BV, jnp.inf), axis=-1, keepdims=True)
  filtered_BV = jnp.where(scaled_BV < floor_B1, -jnp.inf, scaled_BV)
  drawn_B = jax.vmap(jax.random.categorical)(keys_B, filtered_BV)
  return jnp.where(temperature > 0, drawn_B, jnp.argmax(logits_BV, axis=-1))


def _ends_with_stop(tokens_BS: Array, i: Array, lengths_B: Array, stops_ZM: Array) -> Array:
  """Rows whose generated tokens up to position i end with a stop sequence (right-aligned in
  stops_ZM, -1 before it)."""
  width = stops_ZM.shape[1]
  tail_BM = jnp.take(tokens_BS, jnp.maximum(i - width + 1 + jnp.arange(width), 0), axis=1)
  used_ZM = stops_ZM >= 0
  equal_BZ = jnp.all((tail_BM[:, None, :] == stops_ZM[None]) | ~used_ZM[None], axis=-1)
  generated_BZ = i + 1 - used_ZM.sum(1)[None, :] >= lengths_B[:, None]
  return jnp.any(equal_BZ & generated_BZ, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "length"), donate_argnames="cache")
def _prefill_piece(params, tokens_BP, start, cache, *, graphdef, length):
  """The logits after the piece's last token, and the cache with the piece in it (cache None:
  the piece starts the sequences, in a fresh cache of `length` slots)."""
  model = nnx.merge(graphdef, params)
  if cache is None:
    cache = model.init_cache(tokens_BP.shape[0], length)
  positions_BP = start + jnp.broadcast_to(jnp.arange(tokens_BP.shape[1]), tokens_BP.shape)
  h_BPD, cache = model.decode_trunk(tokens_BP, positions_BP, cache)
  return model.unembed(h_BPD[:, -1:])[:, 0], cache


def prefill_pieces(length: int) -> list[int]:
  """Piece sizes that prefill `length` tokens: its bucket (_round_down), then the rest's
  binary digits, largest first (each piece starts at a multiple of its own size)."""
  bucket = _round_down(length)
  rest = length - bucket
  return [bucket] + [1 << k for k in reversed(range(rest.bit_length())) if rest >> k & 1]


def prefill(model: lm.Decoder, tokens_BT: np.ndarray, length: int) -> tuple[Array, list]:
  """The logits after the last of the prompt tokens (positions 0..T-1 in every row) and the
  cache of sequences of up to `length` tokens holding them: model.decode over
  prefill_pieces(T)."""
  graphdef, params = nnx.split(model)
  cache, start = None, 0
  for size in prefill_pieces(tokens_BT.shape[1]):
    piece_BP = tokens_BT[:, start : start + size]
    logits_BV, cache = _prefill_piece(
      params, piece_BP, jnp.int32(start), cache, graphdef=graphdef, length=length
    )
    start += size
  return logits_BV, cache


@functools.partial(jax.jit, static_argnames=("graphdef", "cached"))
def _decode_loop(
  params,
  tokens_BS,
  lengths_B,
  start,
  logits_BV,
  cache,
  max_new,
  eos_id,
  stops_ZM,
  sampling,
  key,
  *,
  graphdef,
  cached,
):
  """Tokens from position `start` on, a token per step; logits_BV and the cache hold the
  prefilled tokens before it (cached=False: None and (), and every step runs the model
  over the whole sequence)."""
  model = nnx.merge(graphdef, params)
  batch, total = tokens_BS.shape
  if not cached:
    logits_BV = jnp.take(model(tokens_BS), start - 1, axis=1)
  limit = jnp.minimum(jnp.max(lengths_B) + max_new, total)
  rows = jnp.arange(batch)

  def running(carry):
    i, _, _, _, done_B, _ = carry
    return (i < limit) & ~jnp.all(done_B)

  def step(carry):
    i, tokens_BS, logits_BV, cache, done_B, count_B = carry
    keys_B = jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), i))(rows)
    drawn_B = sample(logits_BV, keys_B, *sampling)
    prompt_B = i < lengths_B
    token_B = jnp.where(prompt_B, tokens_BS[:, i], jnp.where(done_B, eos_id, drawn_B))
    tokens_BS = tokens_BS.at[:, i].set(token_B)
    new_B = ~prompt_B & ~done_B
    count_B = count_B + new_B
    stop_B = (token_B == eos_id) | (count_B >= max_new)
    if stops_ZM.shape[0]:
      stop_B |= _ends_with_stop(tokens_BS, i, lengths_B, stops_ZM)
    done_B |= new_B & stop_B
    if cached:
      token_B1 = jax.lax.dynamic_slice_in_dim(tokens_BS, i, 1, axis=1)
      logits_B1V, cache = model.decode(token_B1, jnp.full((batch, 1), i), cache)
      logits_BV = logits_B1V[:, 0]
    else:
      logits_BV = jnp.take(model(tokens_BS), i, axis=1)
    return i + 1, tokens_BS, logits_BV, cache, done_B, count_B

  done_B, count_B = jnp.zeros(batch, bool), jnp.zeros(batch, jnp.int32)
  init = (start, tokens_BS, logits_BV, cache, done_B, count_B)
  _, tokens_BS, _, _, _, count_B = jax.lax.while_loop(running, step, init)
  return tokens_BS, count_B


def _round_down(n: int) -> int:
  """A length bucket: a power of two up to 64, then a multiple of 64."""
  return 1 << (n.bit_length() - 1) if n < _BUCKET else n // _BUCKET * _BUCKET


def buffer_length(longest_prompt: int, max_new_tokens: int) -> int:
  """Token slots per row (the cache's length): the prompt and new tokens, rounded up to a
  multiple of 64 so nearby lengths share compiled shapes."""
  return -(-(longest_prompt + max_new_tokens) // _BUCKET) * _BUCKET


def decode(
  model: lm.Decoder,
  tokens_BS: np.ndarray,
  lengths_B: np.ndarray,
  prefilled: tuple[Array, list] | None,
  *,
  max_new_tokens: int,
  eos_id: int = 0,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  stops_ZM: np.ndarray | None = None,
) -> tuple[Array, Array]:
  """The jitted loop after prefill, from the shortest prompt's end: each row of tokens_BS
  holds its prompt (lengths_B tokens) and room for the new ones; `prefilled` is prefill's
  result over the tokens every row has (None: each step runs the model over the whole
  sequences, the uncached reference). stops_ZM: stop sequences, right-aligned, -1 before.
  Returns the filled buffer and each row's count of new tokens (on the device)."""
  graphdef, params = nnx.split(model)
  logits_BV, cache = (None, ()) if prefilled is None else prefilled
  if stops_ZM is None:
    stops_ZM = np.zeros((0, 0), np.int32)
  sampling = (jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p))
  return _decode_loop(
    params,
    tokens_BS,
    lengths_B,
    jnp.int32(lengths_B.min()),
    logits_BV,
    cache,
    jnp.int32(max_new_tokens),
    jnp.int32(eos_id),
    stops_ZM,
    sampling,
    jax.random.key(seed),
    graphdef=graphdef,
    cached=prefilled is not None,
  )


def generate_tokens(
  model: lm.Decoder,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int = 64,
  eos_id: int = 0,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  stop: Sequence[Sequence[int]] = (),
  cached: bool = True,
) -> list[list[int]]:
  """New token ids per prompt (EOS dropped; a stop sequence that ended a row is kept).

  cached=False re-runs the whole sequence every token (the slow reference).
  """
  prompts = [[int(t) for t in p] for p in prompts]
  if not prompts or min(map(len, prompts)) == 0:
    raise ConfigError("every prompt needs at least one token (start it with the EOS separator)")
  if max_new_tokens <= 0:
    return [[] for _ in prompts]
  lengths = np.array([len(p) for p in prompts], np.int32)
  total = buffer_length(int(lengths.max()), max_new_tokens)
  tokens = np.zeros((len(prompts), total), np.int32)
  for row, p in enumerate(prompts):
    tokens[row, : len(p)] = p
  stops = [list(s) for s in stop if len(s)]
  stops_ZM = np.full((len(stops), max(map(len, stops), default=0)), -1, np.int32)
  for z, s in enumerate(stops):
    stops_ZM[z, stops_ZM.shape[1] - len(s) :] = s
  shared = int(lengths.min())
  prefilled = prefill(model, tokens[:, :shared], total) if cached else None
  out, count = jax.device_get(
    decode(
      model,
      tokens,
      lengths,
      prefilled,
      max_new_tokens=max_new_tokens,
      eos_id=eos_id,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      seed=seed,
      stops_ZM=stops_ZM,
    )
  )
  results = []
  for row, (n, c) in enumerate(zip(lengths, count)):
    new = out[row, n : n + c].tolist()
    results.append(new[:-1] if new and new[-1] == eos_id else new)
  return results


def generate(
  model: lm.Decoder,
  tokenizer: Tokenizer,
  prompts: Sequence[str],
  *,
  max_new_tokens: int = 64,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  seed: int = 0,
  stop: Sequence[str] = (),
  max_len: int = 0,
  cached: bool = True,
) -> list[str]:
  """Completions of text prompts, each cut before its first stop string.

  Prompts start with the separator (as training documents do); with max_len,
  prompts lose tokens on the left so prompt + max_new_tokens fits in it.
  """
  ids = [[tokenizer.eos_id, *tokenizer.encode(p)] for p in prompts]
  if max_len:
    keep = max(1, max_len - max_new_tokens)
    ids = [p[-keep:] for p in ids]
  new = generate_tokens(
    model,
    ids,
    max_new_tokens=max_new_tokens,
    eos_id=tokenizer.eos_id,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    seed=seed,
    stop=[tokenizer.encode(s) for s in stop if s],
    cached=cached,
  )
  texts = [tokenizer.decode(t) for t in new]
  return [min((t.split(s, 1)[0] for s in stop if s), key=len, default=t) for t in texts]


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
  """ConfigError, naming the flag, for settings that would generate nothing or sample from
  nothing: checked before a checkpoint is read."""
  if max_new_tokens < 1:
    raise ConfigError(f"--max_new_tokens={max_new_tokens}: should be at least 1")
  if not temperature >= 0:
    raise ConfigError(f"--temperature={temperature:g}: should be >= 0 (0 is greedy)")
  if top_k < 0:
    raise ConfigError(f"--top_k={top_k}: should be >= 0 (0 keeps every token)")
  if not 0 < top_p <= 1:
    raise ConfigError(f"--top_p={top_p:g}: should be in (0, 1] (1 keeps every token)")


def main(argv: Sequence[str]) -> None:
  del argv
  check_sampling(_MAX_NEW_TOKENS.value, _TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  restored = restore.latest(_WORKDIR.value)
  (completion,) = generate(
    restored.model,
    restored.tokenizer,
    [_PROMPT.value],
    max_new_tokens=_MAX_NEW_TOKENS.value,
    temperature=_TEMPERATURE.value,
    top_k=_TOP_K.value,
    top_p=_TOP_P.value,
    seed=_SEED.value,
    stop=_STOP.value,
    max_len=restored.config.train.seq_len,
  )
  if _JSON.value:
    print(json.dumps(dict(prompt=_PROMPT.value, completion=completion)))
  else:
    print(completion)


if __name__ == "__main__":
  from absl import flags

  _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
  _PROMPT = flags.DEFINE_string("prompt", None, "Text to continue.")
  _MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
  _TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Softmax temperature; 0 is greedy.")
  _TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
  _TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample within this much probability mass (nucleus).")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  _STOP = flags.DEFINE_multi_string("stop", [], "Stop before this string (repeatable).")
  _JSON = flags.DEFINE_bool("json", False, 'Print {"prompt", "completion"} as JSON.')
  flags.mark_flags_as_required(["workdir", "prompt"])
  cli.run(main)
