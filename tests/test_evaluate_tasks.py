"""Zero-shot tasks, rolling perplexity, passkey retrieval and the lm-eval adapter on one
tiny trained workdir: scores equal hand-computed log-likelihoods, at any batch size."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from tlm_jax import generate, restore, tasks
from tlm_jax.workdir import read_metrics

REPO = str(helpers.REPO)
SEQ_LEN = helpers.TINY_WORKDIR_SEQ_LEN
STEPS = helpers.TINY_WORKDIR_STEPS

PIQA = [
  dict(goal="How do I boil water?", sol1="Heat it in a pot.", sol2="Put it in ice.", label=0),
  dict(goal="Open a jar", sol1="Twist the lid off.", sol2="Sing to the jar loudly.", label=0),
  dict(goal="Dry wet hands", sol1="Wave them at the moon", sol2="Use a towel.", label=1),
]
HELLASWAG = [
  dict(
    activity_label="Baking",
    ctx_a="A man mixes flour. [title] He adds water.",
    ctx_b="then he",
    ctx="A man mixes flour. [title] He adds water. then he",
    endings=["kneads the dough.", "flies away [header]", "sleeps.", "eats a shoe."],
    label="0",
  ),
  dict(
    activity_label="Running",
    ctx_a="She ties her shoes.",
    ctx_b="she",
    ctx="She ties her shoes. she",
    endings=["runs off.", "def main():", "is blue.", "x = 1"],
    label="0",
  ),
]
# What the harness's templates make of the records above: (contexts, continuations, gold).
EXPECTED = {
  "piqa": [
    ([f"Question: {d['goal']}\nAnswer:"] * 2, [" " + d["sol1"], " " + d["sol2"]], d["label"])
    for d in PIQA
  ],
  "hellaswag": [
    (
      ["Baking: A man mixes flour.. He adds water. Then he"] * 4,
      [" kneads the dough.", " flies away ", " sleeps.", " eats a shoe."],  # sic: harness
      0,
    ),
    (
      ["Running: She ties her shoes. She"] * 4,
      [" runs off.", " def main():", " is blue.", " x = 1"],
      0,
    ),
  ],
  "winogrande": [
    (
      [
        "The cup fell off the table because the cup",
        "The cup fell off the table because the table",
      ],
      [" was tilted.", " was tilted."],
      1,
    ),
  ],
}
WINOGRANDE = [
  dict(
    sentence="The cup fell off the table because the _ was tilted.",
    option1="cup",
    option2="table",
    answer="2",
  )
]
TASK_DATA = {
  "piqa": PIQA,
  "hellaswag": HELLASWAG,
  "winogrande": WINOGRANDE,
  "lambada": [dict(text="the cat sat on the mat and the dog sat on the mat")] * 2,
  "wikitext": [dict(page=" = Title = \n the cat sat on the mat @-@ again . \n" * 6)],
}


@pytest.fixture(scope="module")
def workdir(tiny_workdir):
  return str(tiny_workdir)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("task_data")
  for name, docs in TASK_DATA.items():
    (root / f"{name}.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
  return str(root)


@pytest.fixture(scope="module")
def restored(workdir):
  return restore.latest(workdir)


@pytest.fixture(scope="module")
def plain_loglikelihood(restored):
  """(context, continuation) -> (the sum of the continuation's token log-probs, whether argmax
  gives every one of its tokens) from one plain
  forward pass over separator + bytes, cut on the left to seq_len + 1 tokens (right-padded to
  seq_len so one compile serves all: the model is causal)."""
  forward = jax.jit(lambda params, ids: nnx.merge(restored.graphdef, params)(ids))

  def loglikelihood(context, continuation):
    ids = [0, *context.encode(), *continuation.encode()][-(SEQ_LEN + 1) :]
    padded = np.zeros((1, SEQ_LEN), np.int32)
    padded[0, : len(ids) - 1] = ids[:-1]
    logp = jax.nn.log_softmax(forward(restored.params, padded)[0].astype(jnp.float32))
    scored = range(len(ids) - 1 - len(continuation.encode()), len(ids) - 1)
    greedy = all(int(jnp.argmax(logp[t])) == ids[t + 1] for t in scored)
    return float(sum(logp[t, ids[t + 1]] for t in scored)), greedy

  return loglikelihood


@pytest.mark.parametrize("task", ["piqa", "hellaswag", "winogrande"])
def test_multiple_choice_equals_hand_computed_loglikelihood_at_batch_1_and_7(
  restored, data_dir, plain_loglikelihood, task
):
  hits, hits_norm, lls = [], [], []
  for contexts, continuations, gold in EXPECTED[task]:
    ll = np.array([plain_loglikelihood(c, x)[0] for c, x in zip(contexts, continuations)])
    size = np.array([len(x[1:].encode()) for x in continuations])
    if task == "winogrande":
      size = np.array([len(x.encode()) for x in continuations])
    hits.append(np.argmax(ll) == gold)
    hits_norm.append(np.argmax(ll / size) == gold)
    lls.append(ll)
  results, scores = [], []
  # One device so the batch really is 1 or 7 rows (a mesh pads it to the devices).
  single = jax.device_put(restored.params, jax.devices()[0])
  for batch_size in (1, 7):
    scorer = tasks.Scorer(nnx.merge(restored.graphdef, single), SEQ_LEN, batch_size)
    results.append(tasks.run(scorer, restored.tokenizer, task, data_dir))
    pairs = [
      tasks.encode_pair(restored.tokenizer, c, x)
      for contexts, continuations, _ in EXPECTED[task]
      for c, x in zip(contexts, continuations)
    ]
    scores.append(scorer.loglikelihood(pairs))
  assert results[0] == results[1] and scores[0] == scores[1]
  np.testing.assert_allclose([s for s, _ in scores[0]], np.concatenate(lls), rtol=1e-5, atol=1e-5)
  assert results[0]["n"] == len(EXPECTED[task])
  assert results[0]["acc"] == np.mean(hits)
  assert results[0]["acc_norm"] == np.mean(hits_norm)


@pytest.mark.parametrize("n", [1, 5, 64, 65, 200])
@pytest.mark.parametrize("stride", [64, 24])
def test_rolling_windows_score_every_token_once_with_the_most_context(n, stride):
  tokens = list(range(1, n + 1))
  windows = tasks.rolling_windows(tokens, 0, 64, stride)
  scored = [t for window, k in windows for t in window[len(window) - k :]]
  assert scored == tokens
  end = 0
  for window, k in windows:
    end += k
    assert window == [0, *tokens][max(0, end - 64) : end + 1]  # as much context as fits
    assert k == (min(n, 64) if end == k else min(stride, n - (end - k)))


def test_lambada_and_wikitext_equal_plain_forward(
  restored, data_dir, plain_loglikelihood, tmp_path
):
  scorer = tasks.Scorer(restored.model, SEQ_LEN, 4)
  result = tasks.run(scorer, restored.tokenizer, "lambada", data_dir)
  text = TASK_DATA["lambada"][0]["text"]
  context, word = text.rsplit(" ", 1)
  ll, greedy = plain_loglikelihood(context, " " + word)
  assert result["n"] == 2 and result["acc"] == result["acc_norm"] == float(greedy)
  np.testing.assert_allclose(result["ppl"], np.exp(-ll), rtol=1e-5)

  page = " = Title = \n the cat sat @-@ on the mat . \n"
  text = " = Title =\nthe cat sat-on the mat.\n"  # the harness's detokenizer
  assert tasks.wikitext_detokenize(page) == text
  (tmp_path / "wikitext.jsonl").write_text(json.dumps(dict(page=page)))
  result = tasks.run(scorer, restored.tokenizer, "wikitext", str(tmp_path))
  ll, _ = plain_loglikelihood("", text)
  assert result["n"] == 1 and result["tokens"] == len(text)
  np.testing.assert_allclose(result["ppl"], np.exp(-ll / len(text)), rtol=1e-5)
  np.testing.assert_allclose(result["bits_per_byte"], -ll / len(page) / np.log(2), rtol=1e-5)
  np.testing.assert_allclose(
    result["word_perplexity"], np.exp(-ll / 13), rtol=1e-5
  )  # 13 = len(re.split(r"\s+", page))
  # Longer than a window: strided windows give each token more context and the same count.
  disjoint = tasks.run(scorer, restored.tokenizer, "wikitext", data_dir)
  strided = tasks.run(scorer, restored.tokenizer, "wikitext", data_dir, stride=16)
  assert disjoint["tokens"] == strided["tokens"] > 2 * SEQ_LEN
  assert strided["ppl"] < disjoint["ppl"]


def test_passkey_grid_and_heatmap(restored, tmp_path):
  tokenizer = restored.tokenizer
  for depth in (0.0, 1.0):
    prompt, answer = tasks.passkey_prompt(tokenizer, 400, depth, 12345)
    size = len(tokenizer.encode(prompt + answer)) + 1
    assert 400 - len(tokenizer.encode(tasks.NIAH_FILLER)) < size <= 400
    where = prompt.index("The pass key is 12345")
    if depth == 0:
      assert where == len(tasks.NIAH_INTRO)
    else:
      assert prompt[where:].count(tasks.NIAH_FILLER) == 0
  scorer = tasks.Scorer(restored.model, 512, 8)
  grid = tasks.Niah(lengths=(320, 400), depths=(0.0, 1.0), trials=2)
  result = tasks.run(scorer, tokenizer, "niah", "", grid=grid)
  assert result["n"] == 8 and result["lengths"] == [320, 400] and result["depths"] == [0.0, 1.0]
  table = np.array(result["table"])
  assert table.shape == (2, 2) and set(table.flat) <= {0.0, 0.5, 1.0}
  assert result["acc"] == table.mean()
  tasks.niah_heatmap(result, str(tmp_path / "niah.png"), "test")
  assert (tmp_path / "niah.png").read_bytes()[:4] == b"\x89PNG"
  with pytest.raises(tasks.ConfigError, match="niah length 64 is shorter"):
    tasks.passkey_prompt(tokenizer, 64, 0.5, 12345)


def run_module(module, *args, env=None):
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )


def test_evaluate_cli_writes_tasks_json_and_metrics_rows(workdir, data_dir, tmp_path):
  workdir = str(shutil.copytree(workdir, tmp_path / "run"))  # the shared one stays as it is
  result = run_module(
    "tlm_jax.evaluate",
    "--workdir",
    workdir,
    "--tasks",
    "piqa,lambada,wikitext",
    "--data_dir",
    data_dir,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  printed = json.loads(result.stdout.strip().splitlines()[-1])
  assert set(printed) == {"piqa", "lambada", "wikitext"}
  for name in ("piqa", "lambada"):
    assert {"n", "acc", "acc_norm", "acc_stderr"} <= set(printed[name])
  assert "ppl" in printed["lambada"] and "word_perplexity" in printed["wikitext"]
  with open(os.path.join(workdir, f"tasks_{STEPS}.json")) as f:
    assert json.load(f) == printed
  rows = {r["split"]: r for r in read_metrics(workdir) if r.get("split", "").startswith("task:")}
  assert set(rows) == {"task:piqa", "task:lambada", "task:wikitext"}
  assert rows["task:piqa"]["step"] == STEPS and rows["task:piqa"]["acc"] == printed["piqa"]["acc"]


def run_concurrently(*commands):
  """Several CLI runs at once (each mostly imports and waits): [(returncode, stdout, stderr)]."""
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", *c],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for c in commands
  ]
  outputs = [p.communicate(timeout=600) for p in procs]
  return [(p.returncode, *out) for p, out in zip(procs, outputs)]


def test_evaluate_cli_fails_in_one_line(workdir, data_dir, tmp_path):
  (tmp_path / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  evaluate_ = ("tlm_jax.evaluate", "--workdir")
  missing, untrained, helped = run_concurrently(
    (*evaluate_, workdir, "--tasks", "boolq", "--data_dir", data_dir),
    (*evaluate_, str(tmp_path), "--tasks", "piqa", "--data_dir", data_dir),
    ("tlm_jax.evaluate", "--help"),
  )
  expected = os.path.join(data_dir, "boolq.jsonl")
  assert missing[0] == 2 and missing[2].count("\n") == 1
  assert missing[2].startswith(f"error: task boolq: {expected} not found")
  assert "question, passage, answer" in missing[2]
  assert untrained[0] == 2 and untrained[2].count("\n") == 1
  assert untrained[2].startswith("error: no checkpoint in")
  assert "--tasks" in helped[1] and "--niah_lengths" in helped[1]  # absl exits 1 on --help


TINY_TASKS = {
  "tiny_mc.yaml": """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_choice: "{{{{[sol1, sol2]}}}}"
doc_to_target: label
metric_list:
  - metric: acc
""",
  "tiny_rolling.yaml": """task: tiny_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_text.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""",
  "tiny_gen.yaml": """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/tiny_text.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{text}}}}"
doc_to_target: " mat"
generation_kwargs:
  until: ["."]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""",
}


def test_lm_eval_adapter_runs_local_tasks_and_matches_ours(
  workdir, restored, plain_loglikelihood, tmp_path
):
  pytest.importorskip("lm_eval")
  data = tmp_path / "data"
  data.mkdir()
  (data / "tiny_mc.jsonl").write_text("\n".join(json.dumps(d) for d in PIQA))
  texts = ["the cat sat on the", "the dog sat on the log"]
  (data / "tiny_text.jsonl").write_text("\n".join(json.dumps(dict(text=t)) for t in texts))
  for name, text in TINY_TASKS.items():
    (data / name).write_text(text.format(data=data))
  offline = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
  result = run_module(
    "tlm_jax.lm_eval_adapter",
    "--model",
    "tlm_jax",
    "--model_args",
    f"workdir={workdir}",
    "--batch_size",
    "4",
    "--tasks",
    "tiny_mc,tiny_rolling,tiny_gen",
    "--include_path",
    str(data),
    "--output_path",
    str(tmp_path / "out"),
    "--log_samples",
    env=offline,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  samples = {}
  for root, _, files in os.walk(tmp_path / "out"):
    for name in files:
      if name.startswith("samples_"):
        task = name[len("samples_") :].rsplit("_", 1)[0]
        with open(os.path.join(root, name)) as f:
          samples[task] = [json.loads(line) for line in f]
  assert set(samples) == {"tiny_mc", "tiny_rolling", "tiny_gen"}
  scorer = tasks.Scorer(restored.model, SEQ_LEN, 4)
  for sample in samples["tiny_mc"]:
    arguments = sample["arguments"].values()
    pairs = [tasks.encode_pair(restored.tokenizer, a["arg_0"], a["arg_1"]) for a in arguments]
    ours = [float(s) for s, _ in scorer.loglikelihood(pairs)]
    theirs = [float(r[0][0]) for r in sample["resps"]]
    np.testing.assert_allclose(theirs, ours, rtol=1e-6)
  for sample in samples["tiny_rolling"]:
    text = sample["arguments"]["gen_args_0"]["arg_0"]
    np.testing.assert_allclose(
      float(sample["resps"][0][0]), plain_loglikelihood("", text)[0], rtol=1e-5
    )
  generated = generate.generate(
    restored.model, restored.tokenizer, texts, max_new_tokens=8, stop=["."], max_len=SEQ_LEN
  )
  assert sorted(s["resps"][0][0] for s in samples["tiny_gen"]) == sorted(generated)
