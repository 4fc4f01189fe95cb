"""Hugging Face export (tlm_jax/export_hf.py): the exported model loaded by transformers
computes the JAX model's logits, decodes greedily as tlm_jax.generate does, its tokenizer
encodes as ours, lm-eval's `hf` model scores as our Scorer, and the export reads back into
the same params bit for bit."""

import ast
import functools
import io
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import grain
import jax
import ml_dtypes
import numpy as np
import pytest
import sentencepiece
import torch
import transformers
from flax import nnx

import helpers
from tlm_jax import checkpoint, export_hf, generate, restore, state, tasks
from tlm_jax import workdir as workdir_lib
from tlm_jax.data import tokenizers
from tlm_jax.errors import ConfigError

TOKENS = np.random.default_rng(0).integers(1, 256, (2, 64))

# (backbone, gate, gate_bias, tied, layers_mode): each export feature at least once.
VARIANTS = {
  "transformer": ("transformer", "elementwise", False, False, "unrolled"),
  "transformer_tied_grouped": ("transformer", "elementwise", False, True, "grouped"),
  "gated_elementwise_bias_grouped": ("gated_attention", "elementwise", True, False, "grouped"),
  "gated_headwise_tied": ("gated_attention", "headwise", False, True, "unrolled"),
}


def tiny_config(backbone, gate="elementwise", gate_bias=False, tied=False, layers_mode="unrolled"):
  """configs/*.py:tiny (float32, d 64, 4 query heads over 2 kv heads): cosine widths 384,
  320, 192, 128 unrolled; grouped, a 2-step stepped cosine (2 stacks of 2 equal layers)."""
  config = helpers.load_config(f"tlm_{backbone}", "tiny")
  config.model.update(gate=gate, gate_bias=gate_bias, tie_embeddings=tied, layers_mode=layers_mode)
  if layers_mode == "grouped":
    config.model.taper.update(schedule="stepped", steps=2)
  config.train.seq_len = 64
  return config


def save_workdir(path, config, seed=0):
  """A workdir as training leaves it (config.json, widths.json, a checkpoint) holding random
  params far from init (norms and gate biases too), without training."""
  os.makedirs(path)
  workdir_lib.write_config(str(path), config)
  model = state.build_model(config, seed)
  workdir_lib.write_widths(str(path), model.widths)
  rng = np.random.default_rng(seed)
  flat = []
  for key, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(variable[...])
    noise = rng.standard_normal(value.shape).astype(value.dtype)
    if key[-1] == "scale":  # norm scales
      value = 1 + 0.2 * noise
    elif key[-1] == "b_gate":
      value = 0.5 * noise
    else:
      value = 0.08 * noise
    flat.append((key, variable.replace(value)))
  params = nnx.from_flat_state(flat)
  ckpt = checkpoint.Checkpointer(workdir_lib.path(str(path), workdir_lib.CHECKPOINTS), keep=1)
  ckpt.save(1, dict(params=params), iter(grain.MapDataset.range(4).batch(2)), force=True)
  ckpt.close()
  return str(path)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("export_workdirs")
  return {name: save_workdir(root / name, tiny_config(*v)) for name, v in VARIANTS.items()}


@pytest.fixture(scope="module")
def exports(workdirs, tmp_path_factory):
  """Each workdir exported (tlm format, float32), the first in bfloat16 and as llama."""
  root = tmp_path_factory.mktemp("exports")
  out = {name: str(root / name) for name in workdirs}
  for name, workdir in workdirs.items():
    export_hf.export(workdir, out[name])
  out["bfloat16"] = str(root / "bfloat16")
  export_hf.export(workdirs["transformer"], out["bfloat16"], dtype="bfloat16")
  out["llama"] = str(root / "llama")
  export_hf.export(workdirs["transformer"], out["llama"], "llama")
  return out


@functools.cache
def jax_logits(workdir):
  model = restore.latest(workdir).model
  return np.asarray(helpers.forward(model, TOKENS))


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_through_auto_model(name, workdirs, exports):
  model = transformers.AutoModelForCausalLM.from_pretrained(
    exports[name], trust_remote_code=True, dtype=torch.float32
  )
  config = json.load(open(os.path.join(exports[name], "config.json")))
  assert config["intermediate_size"] == workdir_lib.read_widths(workdirs[name])
  assert len(set(config["intermediate_size"])) > 1
  diff = np.abs(torch_logits(model) - jax_logits(workdirs[name])).max()
  print(f"{name}: max abs logit difference {diff:.2e}")
  assert diff < 1e-4
  if name == "gated_headwise_tied":  # the registry's default (sdpa) above; eager here
    model.set_attn_implementation("eager")
    assert np.abs(torch_logits(model) - jax_logits(workdirs[name])).max() < 1e-4


def test_llama_format_loads_in_stock_llama_with_exact_padding(workdirs, exports):
  d = exports["llama"]
  assert not [f for f in os.listdir(d) if f.endswith(".py")]  # no remote code
  model = transformers.LlamaForCausalLM.from_pretrained(d, dtype=torch.float32)
  widths = workdir_lib.read_widths(workdirs["transformer"])
  assert model.config.intermediate_size == max(widths)
  diff = np.abs(torch_logits(model) - jax_logits(workdirs["transformer"])).max()
  print(f"llama: max abs logit difference {diff:.2e}")
  assert diff < 1e-4
  info = json.load(open(os.path.join(d, export_hf.INFO)))
  padding = info["padding"]
  tapered = transformers.AutoModelForCausalLM.from_pretrained(
    exports["transformer"], trust_remote_code=True
  )
  assert padding["params"] == tapered.num_parameters()
  assert padding["padded_params"] == model.num_parameters()
  assert padding["params_overhead"] > 0 and padding["flops_overhead"] > 0
  printed = export_hf.summary(d, info)  # what the command prints
  assert f"every MLP padded to {max(widths)}: {padding['padded_params']:,} params" in printed
  print(printed)


@pytest.mark.parametrize("name", ["transformer", "llama", "gated_elementwise_bias_grouped"])
def test_load_reads_back_the_same_params(name, workdirs, exports):
  workdir = workdirs["transformer" if name == "llama" else name]
  ours = dict(nnx.to_flat_state(restore.latest(workdir).params))
  loaded = export_hf.load(exports[name])
  loaded = dict(nnx.to_flat_state(nnx.state(loaded, nnx.Param)))
  assert loaded.keys() == ours.keys()
  for key, variable in ours.items():
    a, b = np.asarray(jax.device_get(variable[...])), np.asarray(loaded[key][...])
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), key


def test_bfloat16_export_holds_the_params_rounded(workdirs, exports):
  d = exports["bfloat16"]
  assert json.load(open(os.path.join(d, "config.json")))["dtype"] == "bfloat16"
  model = transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True)
  assert model.dtype == torch.bfloat16
  ours = dict(nnx.to_flat_state(restore.latest(workdirs["transformer"]).params))
  loaded = dict(nnx.to_flat_state(nnx.state(export_hf.load(d), nnx.Param)))
  for key, variable in ours.items():
    rounded = np.asarray(jax.device_get(variable[...])).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(loaded[key][...]), rounded.astype(np.float32))


def test_greedy_generate_with_cache_and_left_padding_matches_ours(workdirs, exports):
  name = "gated_headwise_tied"
  tokenizer = transformers.AutoTokenizer.from_pretrained(exports[name], trust_remote_code=True)
  model = transformers.AutoModelForCausalLM.from_pretrained(exports[name], trust_remote_code=True)
  prompts = ["the cat", "a longer prompt, about a dog and a log"]
  batch = tokenizer(prompts, return_tensors="pt", padding=True)
  assert batch.attention_mask[0, 0] == 0  # the short prompt is padded on the left
  with torch.no_grad():
    out = model.generate(**batch, max_new_tokens=16, do_sample=False)
  theirs = tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
  restored = restore.latest(workdirs[name])
  ours = generate.generate(restored.model, restored.tokenizer, prompts, max_new_tokens=16)
  assert theirs == ours and all(ours)


BYTE_TEXTS = [
  "hello world",
  "  def f(x):\n\treturn x  ",
  "héllo wörld 日本語 🙂",
  "a\0b",
  "<|endoftext|>!",
  "",
]


def check_tokenizer(hf, ours, texts):
  for text in texts:
    ids = [int(i) for i in ours.encode(text)]
    assert hf(text, add_special_tokens=False).input_ids == ids, text
    assert hf(text).input_ids == [ours.eos_id, *ids], text
    assert hf.decode([ours.eos_id, *ids], skip_special_tokens=True) == ours.decode(ids), text


def test_auto_tokenizer_encodes_and_decodes_as_bytes(exports):
  hf = transformers.AutoTokenizer.from_pretrained(exports["transformer"], trust_remote_code=True)
  ours = tokenizers.ByteTokenizer()
  check_tokenizer(hf, ours, BYTE_TEXTS)
  cut = [104, 0, 226, 130, 105]  # a separator and a character cut short
  assert hf.decode(cut, skip_special_tokens=True) == ours.decode(cut)


SPM_CORPUS = ["def add(a, b):\n    return a + b  # 1234", "the cat sat on the mat, 42 times."] * 50
SPM_TEXTS = [
  "def add(a, b):\n    return a + b",
  "the  cat   sat on 12345 mats",
  "  leading and trailing  ",
  "unseen: Zürich ∑ 日本 🙂",
  "</s> and <unk> as text",
]


def train_public_style_spm(prefix, vocab_size=320, **options):
  """A SentencePiece model trained with settings public models use (not ours)."""
  model = io.BytesIO()
  lines = [line for text in SPM_CORPUS for line in text.split("\n") if line.strip()]
  sentencepiece.SentencePieceTrainer.train(
    sentence_iterator=iter(lines),
    model_writer=model,
    vocab_size=vocab_size,
    minloglevel=2,
    **options,
  )
  path = f"{prefix}.model"
  pathlib.Path(path).write_bytes(model.getvalue())
  return path


@pytest.mark.parametrize("kind", ["ours", "dummy_prefix", "unigram_nfkc"])
def test_auto_tokenizer_encodes_and_decodes_as_sentencepiece(kind, tmp_path):
  if kind == "ours":  # python -m tlm_jax.data.tokenizers: BPE, identity, no dummy prefix
    path = tokenizers.train_sentencepiece(SPM_CORPUS, str(tmp_path / "spm"), 320)
  elif kind == "dummy_prefix":
    path = train_public_style_spm(
      tmp_path / "spm",
      model_type="bpe",
      normalization_rule_name="identity",
      remove_extra_whitespaces=False,
      byte_fallback=True,
      eos_id=1,
      bos_id=-1,
    )
  else:
    path = train_public_style_spm(tmp_path / "spm", model_type="unigram", vocab_size=32)
  config = tiny_config("transformer")
  config.data.update(tokenizer="sentencepiece", spm_model=path)
  ours = tokenizers.make_tokenizer(config.data)
  if kind == "unigram_nfkc":
    with pytest.raises(ConfigError, match="data.spm_model=.*model type UNIGRAM, normalization"):
      export_hf.write_tokenizer(str(tmp_path), config.data, ours, 64)
    return
  export_hf.write_tokenizer(str(tmp_path), config.data, ours, 64)
  check_tokenizer(transformers.AutoTokenizer.from_pretrained(str(tmp_path)), ours, SPM_TEXTS)


def test_auto_tokenizer_encodes_and_decodes_as_an_hf_tokenizer(tmp_path):
  path = tokenizers.train_hf(SPM_CORPUS, str(tmp_path / "bpe"), 300)
  config = tiny_config("transformer")
  config.data.update(tokenizer="hf", hf_tokenizer=path)
  ours = tokenizers.make_tokenizer(config.data)
  (tmp_path / "out").mkdir()
  export_hf.write_tokenizer(str(tmp_path / "out"), config.data, ours, 64)
  hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  check_tokenizer(hf, ours, [*SPM_TEXTS, "<|endoftext|> as text"])


@pytest.mark.parametrize(
  "field, value",
  [
    ("backbone", "titans"),
    ("backbone", "hope_attention"),
    ("attention_window", 16),
    ("persistent_tokens", 4),
    ("residual.schedule", "xshape"),
  ],
)
def test_unexported_models_name_the_field(field, value):
  config = tiny_config("transformer")
  config.model.update_from_flattened_dict({field: value})
  spec = export_hf.config_lib.model_spec(config)
  with pytest.raises(ConfigError, match=f"model.{field}="):
    export_hf.check_exportable(spec, "tlm")


def test_llama_format_refuses_the_gate():
  spec = export_hf.config_lib.model_spec(tiny_config("gated_attention"))
  with pytest.raises(ConfigError, match="model.backbone='gated_attention': --format llama"):
    export_hf.check_exportable(spec, "llama")


def test_cli_refuses_titans_in_one_line(tmp_path):
  workdir_lib.write_config(str(tmp_path), helpers.load_config("tlm_titans", "tiny"))
  result = subprocess.run(
    [sys.executable, "-m", "tlm_jax.export_hf", "--workdir", str(tmp_path), "--out", "D"],
    cwd=tmp_path,
    capture_output=True,
    text=True,
    env=helpers.one_device_env(),
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.startswith("error: model.backbone='titans'")
  assert result.stderr.count("\n") == 1 and not (tmp_path / "D").exists()


def test_lm_eval_hf_model_scores_as_our_scorer(workdirs, exports, tmp_path, monkeypatch):
  """lm-eval's own `hf` model (--model hf --model_args pretrained=D,trust_remote_code=True,
  dtype=float32, run in this process) on the local YAML task of the adapter's test."""
  # The task reads a local file: `datasets` (read at its import) looks nothing up online.
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  import datasets
  import lm_eval
  from lm_eval.tasks import TaskManager
  from test_evaluate_tasks import PIQA, TINY_TASKS

  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
  data = tmp_path / "data"
  data.mkdir()
  (data / "tiny_mc.jsonl").write_text("\n".join(json.dumps(d) for d in PIQA))
  (data / "tiny_mc.yaml").write_text(TINY_TASKS["tiny_mc.yaml"].format(data=data))
  name = "gated_elementwise_bias_grouped"
  results = lm_eval.simple_evaluate(
    model="hf",
    model_args=f"pretrained={exports[name]},trust_remote_code=True,dtype=float32",
    tasks=["tiny_mc"],
    device="cpu",
    batch_size=4,
    task_manager=TaskManager(include_path=str(data), include_defaults=False),
    bootstrap_iters=0,
  )
  restored = restore.latest(workdirs[name])
  scorer = tasks.Scorer(restored.model, 64, 4)
  theirs, ours = [], []
  for sample in results["samples"]["tiny_mc"]:
    pairs = [tasks.encode_pair(restored.tokenizer, *a) for a in sample["arguments"]]
    ours += [s for s, _ in scorer.loglikelihood(pairs)]
    theirs += [float(r[0][0]) for r in sample["resps"]]
  assert len(ours) == 2 * len(PIQA)
  np.testing.assert_allclose(theirs, ours, rtol=1e-4)


def test_remote_code_imports_only_torch_and_transformers():
  """The files copied into an export run where tlm_jax is not installed."""
  allowed = {"torch", "transformers", "collections", "__future__"}
  for path in pathlib.Path(export_hf.REMOTE_CODE_DIR).glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        names = [] if node.level else [node.module]  # relative: a sibling file of the export
      else:
        continue
      assert {n.split(".")[0] for n in names} <= allowed, (path.name, names)
  assert set(export_hf.REMOTE_CODE) < {
    p.name for p in pathlib.Path(export_hf.REMOTE_CODE_DIR).iterdir()
  }


def test_setup_installs_the_hf_extra_pins():
  pyproject = tomllib.loads((helpers.REPO / "pyproject.toml").read_text())
  pins = pyproject["project"]["optional-dependencies"]["hf"]
  assert "torch==2.13.0" in pins and all("==" in p for p in pins)
  setup = (helpers.REPO / "launch" / "setup.sh").read_text()
  (line,) = [l for l in setup.splitlines() if '"torch==' in l]
  assert sorted(re.findall(r'"([^"]+)"', line)) == sorted(pins)
