"""Zero-shot tasks as the paper reports them, scored by log-likelihood; passkey retrieval.

Each task reads `DATA_DIR/TASK.jsonl`, one JSON object per line in the public
Hugging Face format of the dataset (the field names of `FORMATS`), and builds
the prompts of lm-evaluation-harness (v0.4) for it:

    piqa        "Question: {goal}\\nAnswer:" -> " {sol1}" | " {sol2}"
    hellaswag   harness preprocessing: "{activity_label}: {ctx_a} {Ctx_b}" with
                WikiHow "[title]"/"[...]" artifacts removed -> " {ending}" x 4
    winogrande  partial scoring: "{sentence up to _}{option}" -> " {rest of sentence}"
    arc_*       "Question: {question}\\nAnswer:" -> " {choices.text[i]}"
    siqa        "Q: {context} {question}\\nA:" -> " {answerA}" | " {answerB}" | " {answerC}"
    boolq       "{passage}\\nQuestion: {question}?\\nAnswer:" -> " no" | " yes"
    lambada     text without its last word -> " {last word}"

Multiple choice picks the continuation with the highest summed log-probability
(`acc`) or the highest log-probability per UTF-8 byte of the choice text
(`acc_norm`; the harness divides by characters, the same for ASCII text, and
calls the byte version acc_bytes). Winogrande's continuation is shared by both
options, so its acc_norm equals acc. LAMBADA: `acc` counts continuations that
greedy decoding reproduces, `ppl` = exp(-mean log-likelihood) as the harness.
`wikitext` is rolling, document-level perplexity (see `rolling_windows`);
`niah` hides a passkey in filler text at several depths and lengths.

Every request starts with the tokenizer's separator (eos_id), the token every
training document follows; contexts longer than seq_len lose tokens on the
left. Requests are padded to a length bucket of their own and batched by bucket,
so a request's score does not depend on the batch it lands in.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tlm_jax import sharding
from tlm_jax.data.tokenizers import Tokenizer
from tlm_jax.errors import ConfigError
from tlm_jax.model import lm

MULTIPLE_CHOICE = (
  "piqa",
  "hellaswag",
  "winogrande",
  "arc_easy",
  "arc_challenge",
  "siqa",
  "boolq",
)
TASKS = ("lambada", *MULTIPLE_CHOICE, "wikitext", "niah")

# task: (required fields, Hugging Face dataset whose format a line follows)
FORMATS = {
  "lambada": (("text",), "EleutherAI/lambada_openai"),
  "piqa": (("goal", "sol1", "sol2", "label"), "piqa"),
  "hellaswag": (("ctx", "endings", "label"), "Rowan/hellaswag"),
  "winogrande": (("sentence", "option1", "option2", "answer"), "allenai/winogrande"),
  "arc_easy": (("question", "choices", "answerKey"), "allenai/ai2_arc ARC-Easy"),
  "arc_challenge": (("question", "choices", "answerKey"), "allenai/ai2_arc ARC-Challenge"),
  "siqa": (("context", "question", "answerA", "answerB", "answerC", "label"), "social_i_qa"),
  "boolq": (("question", "passage", "answer"), "google/boolq"),
  "wikitext": (("page",), "EleutherAI/wikitext_document_level"),
}


def expected_format(task: str) -> str:
  if task == "wikitext":
    return (
      "wikitext.jsonl with one document per line in field 'page' (the Hugging Face "
      "EleutherAI/wikitext_document_level format), or wikitext.txt holding one document"
    )
  fields, dataset = FORMATS[task]
  return f"one JSON object per line with {', '.join(fields)} (the Hugging Face {dataset} format)"


def task_path(task: str, data_dir: str) -> str:
  """Where a task's data is read from; a clear error when it is not there."""
  if task == "niah":
    return ""
  paths = [os.path.join(data_dir, f"{task}.jsonl")]
  if task == "wikitext":
    paths.append(os.path.join(data_dir, "wikitext.txt"))
  for path in paths:
    if os.path.exists(path):
      return path
  raise ConfigError(
    f"task {task}: {' or '.join(paths)} not found; expected {expected_format(task)}. "
    "Nothing is downloaded: put the file there or point --data_dir at its folder"
  )


def parse_tasks(names: str, data_dir: str | None) -> list[str]:
  """'piqa,hellaswag' -> task names, each checked to be known and to have its file."""
  tasks = [t.strip() for t in names.split(",") if t.strip()]
  unknown = [t for t in tasks if t not in TASKS]
  if unknown or not tasks:
    raise ConfigError(f"--tasks={names!r}: unknown task(s) {unknown}; known: {list(TASKS)}")
  if any(t != "niah" for t in tasks) and not data_dir:
    raise ConfigError("--tasks needs --data_dir, the folder holding TASK.jsonl files")
  for task in tasks:
    task_path(task, data_dir or "")
  return tasks


def read_jsonl(task: str, path: str, limit: int = 0) -> list[dict[str, Any]]:
  """The first `limit` (0: all) records, each checked for the format's fields."""
  fields = FORMATS[task][0]
  docs = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        doc = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"task {task}: {path} line {number} is not JSON ({e})") from e
      missing = [k for k in fields if k not in doc]
      if missing:
        raise ConfigError(
          f"task {task}: {path} line {number} lacks {missing}; expected {expected_format(task)}"
        )
      docs.append(doc)
      if limit and len(docs) == limit:
        break
  return docs


# ---------------------------------------------------------------------------
# Scoring: summed log-probabilities of continuations, batched by length bucket.
# ---------------------------------------------------------------------------


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list, list]:
  """Token ids of (separator + context, continuation), split as the harness splits them.

  Trailing spaces of the context move to the continuation; the pair is encoded
  whole and cut after the context's own tokens, so merges across the boundary
  (SentencePiece) go to the continuation.
  """
  spaces = len(context) - len(context.rstrip())
  if spaces:
    context, continuation = context[:-spaces], context[-spaces:] + continuation
  context_ids = [int(i) for i in tokenizer.encode(context)]
  whole = [int(i) for i in tokenizer.encode(context + continuation)]
  return [tokenizer.eos_id, *context_ids], whole[len(context_ids) :]


def bucket(length: int, cap: int) -> int:
  """Padded length for `length` tokens: the next power of two (at least 16), at most cap."""
  padded = max(16, 1 << (length - 1).bit_length())
  return min(padded, max(cap, length))


@functools.cache
def _scoring_step(graphdef: nnx.GraphDef, mesh: Mesh | None) -> Callable:
  """jit: per row, the summed log-probs of the scored targets and whether all are the argmax.
  One per (graph, mesh), so every Scorer of a model shares its compiled shapes."""
  out = None if mesh is None else NamedSharding(mesh, PartitionSpec())

  def step(params, tokens_BT, scored_BT):
    logits_BTV = nnx.merge(graphdef, params)(tokens_BT[:, :-1])
    targets_BT = tokens_BT[:, 1:]
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32))
    logp_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], -1)[..., 0]
    greedy_BT = jnp.argmax(logits_BTV, -1) == targets_BT
    return (
      jnp.where(scored_BT, logp_BT, 0.0).sum(1),
      jnp.all(greedy_BT | ~scored_BT, axis=1),
    )

  return jax.jit(step, out_shardings=out)


class Scorer:
  """Log-likelihoods of token windows under a model on its mesh.

  A window is (tokens, n): tokens[:-1] go in, and the last n of tokens[1:] are
  scored. Windows are padded to their own length bucket and batched by bucket;
  the batch is split over the mesh's data x fsdp axes (rows are added to fill
  it), so a window's score never depends on the other windows.
  """

  def __init__(self, model: lm.Decoder, seq_len: int, batch_size: int = 16):
    self.graphdef, self.params = nnx.split(model)
    self.seq_len = seq_len
    sample = jax.tree.leaves(self.params)[0].sharding
    self.mesh = sample.mesh if isinstance(sample, NamedSharding) else None
    parallel = 1
    if isinstance(self.mesh, Mesh):
      parallel = math.prod(self.mesh.shape[a] for a in sharding.BATCH_AXES)
    self.batch_size = -(-batch_size // parallel) * parallel
    self._step = _scoring_step(self.graphdef, self.mesh)

  def _put(self, x: np.ndarray) -> jax.Array:
    if self.mesh is None:
      return jnp.asarray(x)
    sh = NamedSharding(self.mesh, PartitionSpec(sharding.BATCH_AXES))
    return jax.make_array_from_callback(x.shape, sh, lambda index: x[index])

  def windows(self, windows: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
    """(log-likelihood of the scored tokens, whether greedy decoding reproduces them all)."""
    by_length: dict[int, list[int]] = {}
    for i, (tokens, _) in enumerate(windows):
      if len(tokens) > self.seq_len + 1:
        raise ValueError(f"window of {len(tokens)} tokens is longer than seq_len + 1")
      length = bucket(len(tokens) - 1, self.seq_len)
      by_length.setdefault(length, []).append(i)
    results: list[Any] = [None] * len(windows)
    for length, indices in sorted(by_length.items()):
      for start in range(0, len(indices), self.batch_size):
        rows = indices[start : start + self.batch_size]
        tokens = np.zeros((self.batch_size, length + 1), np.int32)
        scored = np.zeros((self.batch_size, length), bool)
        for r, i in enumerate(rows):
          window, n = windows[i]
          tokens[r, : len(window)] = window
          scored[r, len(window) - 1 - n : len(window) - 1] = True
        logp, greedy = jax.device_get(self._step(self.params, self._put(tokens), self._put(scored)))
        for r, i in enumerate(rows):
          results[i] = (float(logp[r]), bool(greedy[r]))
    return results

  def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list:
    """(context ids, continuation ids) -> (log p(continuation | context), is greedy); the
    context is cut from the left to fit seq_len (so is the continuation, past that)."""
    windows = []
    for context, continuation in requests:
      whole = [*context, *continuation][-(self.seq_len + 1) :]
      windows.append((whole, min(len(continuation), len(whole) - 1)))
    return self.windows(windows)


def rolling_windows(
  tokens: Sequence[int], prefix: int, max_len: int, stride: int
) -> list[tuple[list[int], int]]:
  """Windows scoring every token of a document once, each with as much context as fits.

  The first window reads [prefix, t_0 ..] and scores up to max_len tokens; each
  next one ends `stride` tokens later and scores only those, seeing the
  max_len - stride tokens before them as context (stride = max_len: disjoint
  windows, the harness's loglikelihood_rolling; a smaller stride gives each
  token more context, at max_len / stride times the compute).
  """
  full, done, out = [prefix, *tokens], 0, []
  while done < len(tokens):
    end = min(done + (max_len if done == 0 else stride), len(tokens))
    out.append((full[max(0, end - max_len) : end + 1], end - done))
    done = end
  return out


# ---------------------------------------------------------------------------
# Tasks.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Choices:
  """One multiple-choice question: a (context, continuation) per option, and the answer."""

  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  lengths: tuple[int, ...]  # UTF-8 bytes each option is normalised by (acc_norm)
  gold: int


def _options(query: str, options: Sequence[str], gold: Any) -> Choices:
  return Choices(
    (query,) * len(options),
    tuple(" " + o for o in options),
    tuple(len(o.encode("utf-8")) for o in options),
    int(gold),
  )


def _hellaswag_clean(text: str) -> str:
  """The harness's preprocessing: WikiHow '[title]' marks become '. ', other [..] go."""
  text = re.sub(r"\[.*?\]", "", text.strip().replace(" [title]", ". "))
  return text.replace("  ", " ")


def _hellaswag(doc: dict[str, Any]) -> Choices:
  ctx = doc["ctx"]
  if "ctx_a" in doc and "ctx_b" in doc:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
  if doc.get("activity_label"):
    ctx = doc["activity_label"] + ": " + ctx
  return _options(
    _hellaswag_clean(ctx), [_hellaswag_clean(e) for e in doc["endings"]], doc["label"]
  )


def _winogrande(doc: dict[str, Any]) -> Choices:
  """Partial scoring: each option fills the blank in the context; the rest is scored."""
  sentence = doc["sentence"]
  blank = sentence.index("_")
  rest = " " + sentence[blank + 1 :].strip()
  options = (doc["option1"], doc["option2"])
  size = len(rest.encode("utf-8"))
  return Choices(
    tuple(sentence[:blank] + o for o in options), (rest, rest), (size, size), int(doc["answer"]) - 1
  )


def _arc(doc: dict[str, Any]) -> Choices:
  choices = doc["choices"]
  return _options(
    f"Question: {doc['question']}\nAnswer:",
    choices["text"],
    choices["label"].index(doc["answerKey"]),
  )


BUILDERS: dict[str, Callable[[dict[str, Any]], Choices]] = {
  "piqa": lambda d: _options(f"Question: {d['goal']}\nAnswer:", [d["sol1"], d["sol2"]], d["label"]),
  "hellaswag": _hellaswag,
  "winogrande": _winogrande,
  "arc_easy": _arc,
  "arc_challenge": _arc,
  "siqa": lambda d: _options(
    f"Q: {d['context']} {d['question']}\nA:",
    [d["answerA"], d["answerB"], d["answerC"]],
    int(d["label"]) - 1,
  ),
  "boolq": lambda d: _options(
    f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:", ["no", "yes"], d["answer"]
  ),
}


def _stderr(hits: np.ndarray) -> float | None:
  """Standard error of a mean of 0/1 outcomes (sample std / sqrt(n), as the harness)."""
  n = len(hits)
  return float(np.std(hits, ddof=1) / math.sqrt(n)) if n > 1 else None


def accuracy(hits: Sequence[bool], prefix: str = "acc") -> dict[str, Any]:
  hits = np.asarray(hits, np.float64)
  return {prefix: float(hits.mean()), f"{prefix}_stderr": _stderr(hits)}


def multiple_choice(
  scorer: Scorer, tokenizer: Tokenizer, questions: Sequence[Choices]
) -> dict[str, Any]:
  """acc and acc_norm over questions, from one batched pass over every option."""
  requests = [
    encode_pair(tokenizer, c, x) for q in questions for c, x in zip(q.contexts, q.continuations)
  ]
  scores = iter(scorer.loglikelihood(requests))
  hits, hits_norm = [], []
  for q in questions:
    ll = np.array([next(scores)[0] for _ in q.contexts])
    hits.append(int(np.argmax(ll)) == q.gold)
    hits_norm.append(int(np.argmax(ll / np.maximum(np.array(q.lengths), 1))) == q.gold)
  return dict(n=len(questions), **accuracy(hits), **accuracy(hits_norm, "acc_norm"))


def lambada(scorer: Scorer, tokenizer: Tokenizer, docs: Sequence[dict[str, Any]]) -> dict:
  pairs = [d["text"].rsplit(" ", 1) for d in docs]
  scores = scorer.loglikelihood([encode_pair(tokenizer, c, " " + w) for c, w in pairs])
  hits = [greedy for _, greedy in scores]
  ll = np.array([s for s, _ in scores])
  out = dict(n=len(docs), **accuracy(hits), **accuracy(hits, "acc_norm"))
  out["ppl"] = float(np.exp(-ll.mean()))
  return out


# The harness's WikiText detokenizer (the raw dump's Moses-style tokens -> plain text), in order.
_SEPARATORS = (
  ("s '", "s'"),
  (" @-@ ", "-"),
  (" @,@ ", ","),
  (" @.@ ", "."),
  *((f" {p} ", f"{p} ") for p in ":;.!?,"),
)
_BRACKETS = (
  (r"\(\s*([^\)]*?)\s*\)", r"(\1)"),
  (r"\[\s*([^\]]*?)\s*\]", r"[\1]"),
  (r"{\s*([^}]*?)\s*}", r"{\1}"),
  (r"\"\s*([^\"]*?)\s*\"", r'"\1"'),
  (r"'\s*([^']*?)\s*'", r"'\1'"),
)
_MISC = (
  ("= = = =", "===="),
  ("= = =", "==="),
  ("= =", "=="),
  (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}"),
  (" \n", "\n"),
  ("\n ", "\n"),
  (" N ", " 1 "),
  (" 's", "'s"),
)


def wikitext_detokenize(text: str) -> str:
  for old, new in _SEPARATORS:
    text = text.replace(old, new)
  for pattern, replacement in _BRACKETS:
    text = re.sub(pattern, replacement, text)
  for old, new in _MISC:
    text = text.replace(old, new)
  return text


def wikitext(
  scorer: Scorer, tokenizer: Tokenizer, path: str, stride: int, limit: int = 0
) -> dict[str, Any]:
  """Rolling perplexity per document: token ppl, and word/byte perplexity and bits per byte
  over the raw text's words and bytes (the harness's wikitext metrics)."""
  if path.endswith(".txt"):
    with open(path) as f:
      pages = [f.read()]
  else:
    pages = [d["page"] for d in read_jsonl("wikitext", path, limit)]
  windows, tokens = [], 0
  for page in pages:
    ids = [int(t) for t in tokenizer.encode(wikitext_detokenize(page))]
    tokens += len(ids)
    windows += rolling_windows(ids, tokenizer.eos_id, scorer.seq_len, stride or scorer.seq_len)
  ll = sum(s for s, _ in scorer.windows(windows))
  words = sum(len(re.split(r"\s+", p)) for p in pages)
  size = sum(len(p.encode("utf-8")) for p in pages)
  return dict(
    n=len(pages),
    tokens=tokens,
    ppl=math.exp(-ll / max(tokens, 1)),
    word_perplexity=math.exp(-ll / max(words, 1)),
    byte_perplexity=math.exp(-ll / max(size, 1)),
    bits_per_byte=-ll / max(size, 1) / math.log(2),
  )


# ---------------------------------------------------------------------------
# Needle in a haystack: passkey retrieval (Mohtashami & Jaggi 2023's prompt).
# ---------------------------------------------------------------------------

NIAH_INTRO = (
  "There is an important info hidden inside a lot of irrelevant text. "
  "Find it and memorize it. I will quiz you about the important information there. "
)
NIAH_FILLER = (
  "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NIAH_QUESTION = "What is the pass key? The pass key is"
NIAH_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class Niah:
  """Passkey grid: prompts of `lengths` tokens (answer included), the key `depths` of the
  way into the filler (0: first, 1: last), `trials` random 5-digit keys per cell."""

  lengths: tuple[int, ...]
  depths: tuple[float, ...] = NIAH_DEPTHS
  trials: int = 4
  seed: int = 0


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, key: int) -> tuple[str, str]:
  """(prompt, answer) of about `length` tokens with the key after depth x the filler."""
  needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
  answer = f" {key}"
  fixed = len(tokenizer.encode(NIAH_INTRO + needle + NIAH_QUESTION + answer)) + 1
  if fixed > length:
    raise ConfigError(
      f"niah length {length} is shorter than the passkey prompt without filler ({fixed} "
      "tokens); use longer --niah_lengths (at most train.seq_len)"
    )
  units = max(0, (length - fixed) // len(tokenizer.encode(NIAH_FILLER)))
  before = round(depth * units)
  filler_before, filler_after = NIAH_FILLER * before, NIAH_FILLER * (units - before)
  return NIAH_INTRO + filler_before + needle + filler_after + NIAH_QUESTION, answer


def niah(scorer: Scorer, tokenizer: Tokenizer, grid: Niah) -> dict[str, Any]:
  """Accuracy table lengths x depths: a hit when greedy decoding gives the key exactly."""
  rng = np.random.default_rng(grid.seed)
  cells = [(l, d) for l in grid.lengths for d in grid.depths for _ in range(grid.trials)]
  keys = rng.integers(10_000, 100_000, len(cells))
  requests = [
    encode_pair(tokenizer, *passkey_prompt(tokenizer, l, d, int(k)))
    for (l, d), k in zip(cells, keys)
  ]
  hits = np.array([g for _, g in scorer.loglikelihood(requests)], np.float64)
  table = hits.reshape(len(grid.lengths), len(grid.depths), grid.trials).mean(-1)
  return dict(
    n=len(cells),
    **accuracy(hits),
    **accuracy(hits, "acc_norm"),
    lengths=list(grid.lengths),
    depths=list(grid.depths),
    trials=grid.trials,
    table=table.tolist(),
  )


def niah_heatmap(result: dict[str, Any], path: str, title: str) -> None:
  """Accuracy per (length, depth) as a PNG: rows are lengths, columns depths."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  table = np.array(result["table"])
  fig, ax = plt.subplots(figsize=(1.2 * table.shape[1] + 2, 0.6 * table.shape[0] + 1.6))
  image = ax.imshow(table, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
  ax.set_xticks(range(table.shape[1]), [f"{d:g}" for d in result["depths"]])
  ax.set_yticks(range(table.shape[0]), [str(l) for l in result["lengths"]])
  ax.set_xlabel("passkey depth (fraction of the filler before it)")
  ax.set_ylabel("context length (tokens)")
  ax.set_title(title)
  for (r, c), value in np.ndenumerate(table):
    ax.text(c, r, f"{value:.2f}", ha="center", va="center")
  fig.colorbar(image, ax=ax, label="accuracy")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(
  scorer: Scorer,
  tokenizer: Tokenizer,
  task: str,
  data_dir: str,
  *,
  limit: int = 0,
  stride: int = 0,
  grid: Niah | None = None,
) -> dict[str, Any]:
  """One task's metrics: {n, acc, acc_norm, acc_stderr, ...} (wikitext: perplexities)."""
  if task == "niah":
    return niah(scorer, tokenizer, grid or Niah(default_niah_lengths(scorer.seq_len)))
  path = task_path(task, data_dir)
  if task == "wikitext":
    return wikitext(scorer, tokenizer, path, stride, limit)
  docs = read_jsonl(task, path, limit)
  if task == "lambada":
    return lambada(scorer, tokenizer, docs)
  questions = []
  for number, doc in enumerate(docs, 1):
    try:
      questions.append(BUILDERS[task](doc))
    except (KeyError, ValueError, TypeError, IndexError) as e:
      raise ConfigError(
        f"task {task}: {path} record {number} does not fit {expected_format(task)} "
        f"({type(e).__name__}: {e})"
      ) from e
  return multiple_choice(scorer, tokenizer, questions)


def default_niah_lengths(seq_len: int) -> tuple[int, ...]:
  return tuple(sorted({max(64, seq_len // 4), max(64, seq_len // 2), seq_len}))
