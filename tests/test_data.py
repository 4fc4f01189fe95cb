"""Data: builders work offline and split cleanly; the pipeline packs, shards and resumes exactly."""

import itertools
import json
import os
import pathlib
import pickle
import subprocess
import sys

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from absl import flags

from tlm_jax import config as config_lib
from tlm_jax.data import builders, pipeline, pretokenize, tokenizers
from tlm_jax.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_config(data_dir, batch_size=4, seq_len=32, seed=0, **data):
  data = (
    dict(
      source="builtin",
      name="",
      data_dir=str(data_dir),
      files="",
      text_field="text",
      tokenizer="byte",
      spm_model="",
      hf_tokenizer="",
      worker_count=0,
      pretokenized=False,
    )
    | data
  )
  return ml_collections.ConfigDict(
    dict(seed=seed, train=dict(batch_size=batch_size, seq_len=seq_len), data=data)
  )


def take(it, n):
  return list(itertools.islice(it, n))


def stream(batches):
  """The token stream the batches were cut from: a row is window[:-1], its last target ends it."""
  windows = [np.concatenate([b["inputs"], b["targets"][:, -1:]], 1) for b in batches]
  return np.concatenate([w.ravel() for w in windows])


def expected_stream(tokenizer, docs):
  return np.concatenate([np.append(tokenizer.encode(d), tokenizer.eos_id) for d in docs])


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def data_dir(builtin_data_dir):
  return builtin_data_dir


class TinyText(tfds.core.GeneratorBasedBuilder):
  """A stand-in for a prepared public dataset (like lm1b): text in a `content` feature."""

  VERSION = tfds.core.Version("1.0.0")
  DOCS = {
    "train": [f"train document {i}: héllo wörld" for i in range(20)],
    "validation": [f"validation document {i}" for i in range(5)],
  }

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({"content": tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(docs) for split, docs in self.DOCS.items()}

  def _generate_examples(self, docs):
    for i, text in enumerate(docs):
      yield i, {"content": text}


# --- builders -----------------------------------------------------------------


def test_builtin_corpus_builds_offline_disjoint_and_deterministic(data_dir, tmp_path):
  cfg = make_config(data_dir).data
  train, val = list(builders.source(cfg, "train")), list(builders.source(cfg, "validation"))
  assert len(train) > 100 and len(val) >= 1
  assert not set(train) & set(val)
  assert sum(map(len, train)) > 5_000_000
  assert any("Python" in d and "def " not in d for d in train)  # reference prose
  assert any(d.lstrip().startswith(('"""', "#")) and "def " in d for d in train)  # stdlib code
  again = make_config(tmp_path).data
  assert list(builders.source(again, "train")) == train
  assert list(builders.source(again, "validation")) == val
  assert repr(builders.source(again, "train")) == repr(builders.source(cfg, "train"))


def test_local_files_round_trip(tmp_path):
  texts = {"a.txt": "Plain text, ünïcödé ✓.\n\nSecond paragraph.\n", "b.txt": "another file\n"}
  for name, text in texts.items():
    (tmp_path / name).write_text(text, encoding="utf-8")
  rows = [{"body": f"json doc {i} — «{i}»", "id": i} for i in range(6)]
  (tmp_path / "c.jsonl").write_text(
    "\n".join(json.dumps(r, ensure_ascii=False) for r in rows[:3])
    + "\n\n"
    + "\n".join(json.dumps(r) for r in rows[3:])
    + "\n",
    encoding="utf-8",
  )
  cfg = make_config(
    tmp_path / "tfds",
    source="local",
    text_field="body",
    files=f"{tmp_path}/*.txt,{tmp_path}/*.jsonl",
  ).data
  got = list(builders.source(cfg, "train")) + list(builders.source(cfg, "validation"))
  assert sorted(got) == sorted([*texts.values(), *(r["body"] for r in rows)])
  assert len(list(builders.source(cfg, "validation"))) >= 1
  # A different file set (or text field) is a different dataset, not stale files.
  assert (
    builders.local_config(f"{tmp_path}/*.txt", "body").name
    != builders.local_config(cfg.files, "body").name
    != builders.local_config(cfg.files, "text").name
  )


def test_a_local_dataset_built_at_1_0_0_keeps_being_read(tmp_path):
  """A run started before documents were keyed by number resumes over its own build."""
  for name in ("a", "b", "c"):
    (tmp_path / f"{name}.txt").write_text(f"document {name}\n")
  cfg = make_config(tmp_path / "tfds", source="local", files=f"{tmp_path}/*.txt").data
  built = pathlib.Path(builders.build_if_needed(cfg).data_dir)
  # What TFDS left of a 1.0.0 build (it no longer generates that version).
  info = json.loads((built / "dataset_info.json").read_text())
  (built / "dataset_info.json").write_text(json.dumps(dict(info, version="1.0.0")))
  built.rename(built.parent / "1.0.0")
  builder = builders.build_if_needed(cfg)
  assert str(builder.version) == "1.0.0" and not built.exists()
  texts = list(builders.source(cfg, "train")) + list(builders.source(cfg, "validation"))
  assert sorted(texts) == [f"document {name}\n" for name in ("a", "b", "c")]


def test_tfds_dataset_by_name_through_pipeline(tmp_path):
  TinyText(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
  config = make_config(
    tmp_path, batch_size=2, seq_len=16, source="tfds", name="tiny_text", text_field="content"
  )
  batches = take(pipeline.make_iterator(config, "validation", num_epochs=1), 100)
  want = expected_stream(tokenizers.ByteTokenizer(), builders.source(config.data, "validation"))
  got = stream(batches)
  assert len(got) == len(want) // (2 * 17) * 2 * 17
  np.testing.assert_array_equal(got, want[: len(got)])
  assert sorted(builders.source(config.data, "train")) == sorted(TinyText.DOCS["train"])


@pytest.fixture(scope="module")
def jsonl_and_parquet(tmp_path_factory):
  """Configs of the same 3000 short documents as a JSONL file and as a Parquet file of 8 row
  groups with another column beside the text."""
  folder = tmp_path_factory.mktemp("formats")
  texts = [f"document {i}: " + "naïve words " * (i % 13) + "\n" * (i % 3) for i in range(3000)]
  (folder / "docs.jsonl").write_text("".join(json.dumps(dict(text=t)) + "\n" for t in texts))
  table = pa.table(dict(id=range(len(texts)), text=texts))
  pq.write_table(table, folder / "docs.parquet", row_group_size=400)
  return [
    make_config(folder / "tfds", batch_size=8, seq_len=64, source="local", files=str(file))
    for file in (folder / "docs.jsonl", folder / "docs.parquet")
  ]


def test_parquet_gives_the_batches_of_the_same_jsonl_and_resumes_alike(jsonl_and_parquet):
  jsonl, parquet = jsonl_and_parquet
  for split in ("train", "validation"):
    docs = list(builders.source(parquet.data, split))
    assert docs == list(builders.source(jsonl.data, split))
  assert len(docs) >= 1 and len(list(builders.source(parquet.data, "train"))) > 2800
  assert builders.source(jsonl.data, "train").name != builders.source(parquet.data, "train").name
  want = take(pipeline.make_iterator(jsonl, "train"), 12)
  it = pipeline.make_iterator(parquet, "train")
  assert_same_batches(take(it, 7), want[:7])
  resumed = pipeline.make_iterator(parquet, "train")
  resumed.set_state(it.get_state())
  assert_same_batches(take(resumed, 5), want[7:])
  assert_same_batches(
    take(pipeline.make_iterator(parquet, "validation", num_epochs=1), 100),
    take(pipeline.make_iterator(jsonl, "validation", num_epochs=1), 100),
  )


def test_parquet_pretokenizes_to_the_windows_of_the_same_jsonl(jsonl_and_parquet):
  windows = []
  for config in jsonl_and_parquet:
    counts = pretokenize.build(config, ["train", "validation"])
    assert counts["train"] > 100
    windows.append(pretokenize.open_windows(config, "train"))
  assert len(windows[0]) == len(windows[1])
  rows = np.arange(len(windows[0]))
  np.testing.assert_array_equal(windows[1].read(rows), windows[0].read(rows))


def test_parquet_errors_name_the_column_and_row(tmp_path):
  def local(file):
    return make_config(tmp_path / "tfds", source="local", files=str(file)).data

  pq.write_table(pa.table(dict(body=["a", "b"], n=[1, 2])), tmp_path / "body.parquet")
  with pytest.raises(
    ConfigError, match=r"data\.text_field='text' \(its columns: body \(string\), n"
  ):
    builders.source(local(tmp_path / "body.parquet"), "train")
  pq.write_table(pa.table(dict(text=["a", None, "c"])), tmp_path / "gap.parquet")
  with pytest.raises(ConfigError, match=r"gap\.parquet row 1: 'text' is null"):
    builders.source(local(tmp_path / "gap.parquet"), "train")
  (tmp_path / "fake.parquet").write_text("not parquet")
  with pytest.raises(ConfigError, match=r"fake\.parquet is not a Parquet file"):
    builders.source(local(tmp_path / "fake.parquet"), "train")


# --- pipeline -----------------------------------------------------------------


def test_batches_pack_the_corpus_text(data_dir):
  config = make_config(data_dir, batch_size=4, seq_len=32)
  batches = take(pipeline.make_iterator(config, "validation"), 20)
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == {
      "inputs": ((4, 32), np.int32),
      "targets": ((4, 32), np.int32),
    }
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  tok = tokenizers.ByteTokenizer()
  docs = builders.source(config.data, "validation")
  got = stream(batches)
  np.testing.assert_array_equal(got, expected_stream(tok, docs)[: len(got)])
  assert tok.decode(got).startswith(docs[0][:500])
  # Evaluation streams are identical on every call.
  assert_same_batches(take(pipeline.make_iterator(config, "validation"), 20), batches)


def test_train_order_depends_only_on_seed(data_dir):
  def first_batches(seed):
    return take(pipeline.make_iterator(make_config(data_dir, seed=seed), "train"), 3)

  first = first_batches(0)
  assert_same_batches(first_batches(0), first)
  other = first_batches(1)
  assert not np.array_equal(other[0]["inputs"], first[0]["inputs"])


def test_get_state_set_state_resumes_exactly(data_dir):
  config = make_config(data_dir, batch_size=4, seq_len=64)
  it = pipeline.make_iterator(config, "train")
  take(it, 37)
  state = it.get_state()
  want = take(it, 25)
  fresh = pipeline.make_iterator(config, "train")
  fresh.set_state(state)
  assert_same_batches(take(fresh, 25), want)


def test_orbax_composite_checkpoint_holds_the_iterator(data_dir, tmp_path):
  config = make_config(data_dir)
  it = pipeline.make_iterator(config, "train")
  take(it, 11)
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(
    11,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave({"w": np.arange(3.0)}), data=grain.checkpoint.CheckpointSave(it)
    ),
  )
  mngr.wait_until_finished()
  want = take(it, 5)
  fresh = pipeline.make_iterator(config, "train")
  mngr.restore(
    11,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore({"w": np.zeros(3)}),
      data=grain.checkpoint.CheckpointRestore(fresh),
    ),
  )
  assert_same_batches(take(fresh, 5), want)


def test_processes_split_the_rows_of_one_global_batch(data_dir):
  config = make_config(data_dir, batch_size=8, seq_len=32)
  whole = take(pipeline.make_iterator(config, "train"), 3)
  halves = [
    take(pipeline.make_iterator(config, "train", process_index=i, process_count=2), 3)
    for i in range(2)
  ]
  for step, batch in enumerate(whole):
    assert halves[0][step]["inputs"].shape == (4, 32)
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(
        np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key]
      )
  assert not np.array_equal(halves[0][0]["inputs"], halves[1][0]["inputs"])


def test_worker_processes_give_the_same_batches(data_dir):
  flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags (a trainer runs under app.run)
  config = make_config(data_dir)
  want = take(pipeline.make_iterator(config, "train"), 12)
  config.data.worker_count = 1
  it = pipeline.make_iterator(config, "train")
  assert_same_batches(take(it, 6), want[:6])
  state = it.get_state()
  it.close()
  fresh = pipeline.make_iterator(config, "train")
  fresh.set_state(state)
  assert_same_batches(take(fresh, 6), want[6:])
  fresh.close()


# --- tokenizers ---------------------------------------------------------------


def test_byte_tokenizer_round_trip():
  tok = tokenizers.ByteTokenizer()
  text = "naïve café — 東京 ✓ 🙂\n\tcode()"
  ids = tok.encode(text + "\0")  # NUL is the separator: stripped from text
  assert ids.dtype == np.int32 and tok.eos_id not in ids
  assert tok.decode(np.append(ids, tok.eos_id)) == text
  assert tok.bytes_per_token[np.append(ids, tok.eos_id)].sum() == len(text.encode()) + 1


@pytest.fixture(scope="module")
def spm_model(data_dir, tmp_path_factory):
  docs = builders.source(make_config(data_dir).data, "train")
  prefix = tmp_path_factory.mktemp("spm") / "builtin"
  return tokenizers.train_sentencepiece(docs, str(prefix), 512, max_bytes=300_000)


def test_sentencepiece_round_trip_and_bytes(data_dir, spm_model):
  tok = tokenizers.make_tokenizer(
    make_config(data_dir, tokenizer="sentencepiece", spm_model=spm_model).data
  )
  assert tok.vocab_size == 512 and tok.eos_id == 1 and tok.bytes_per_token.shape == (512,)
  doc = builders.source(make_config(data_dir).data, "validation")[0][:3000]
  for text in (doc, "  indented:\n\tnaïve 東京 ✓ 🙂\n"):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) < len(text.encode())
    assert tok.decode(np.append(ids, tok.eos_id)) == text
    # No dummy prefix is trained in, so the bytes add up exactly.
    assert tok.bytes_per_token[ids].sum() == len(text.encode())
  assert tok.bytes_per_token[tok.eos_id] == 1


@pytest.fixture(scope="module")
def hf_tokenizer(data_dir, tmp_path_factory):
  docs = builders.source(make_config(data_dir).data, "train")
  prefix = tmp_path_factory.mktemp("hf") / "builtin"
  return tokenizers.train_hf(docs, str(prefix), 512, max_bytes=300_000)


def test_hf_tokenizer_round_trip_bytes_and_batches(data_dir, hf_tokenizer, tmp_path):
  config = make_config(data_dir, tokenizer="hf", hf_tokenizer=hf_tokenizer)
  tok = tokenizers.make_tokenizer(config.data)
  assert tok.vocab_size == 512 and tok.eos_id == 0 and tok.bytes_per_token.shape == (512,)
  docs = builders.source(config.data, "validation")
  copy = pickle.loads(pickle.dumps(tok))  # as Grain's worker processes get it
  for text in (docs[0][:3000], "  indented:\n\tnaïve 東京 ✓ 🙂\n", "text <|endoftext|> text"):
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and tok.eos_id not in ids  # a written separator is text
    assert tok.decode(np.append(ids, tok.eos_id)) == text
    assert tok.bytes_per_token[ids].sum() == len(text.encode())
    np.testing.assert_array_equal(copy.encode(text), ids)
  assert len(tok.encode(docs[0])) < len(docs[0].encode()) / 2
  # A folder holding tokenizer.json (as a Hub download is) reads the same.
  (tmp_path / "tokenizer.json").write_bytes(open(hf_tokenizer, "rb").read())
  np.testing.assert_array_equal(
    tokenizers.HFTokenizer(str(tmp_path)).encode(docs[0]), tok.encode(docs[0])
  )
  got = stream(take(pipeline.make_iterator(config, "validation"), 3))
  np.testing.assert_array_equal(got, expected_stream(tok, docs)[: len(got)])
  model = ml_collections.ConfigDict(dict(model=dict(vocab_size=256), data=config.data))
  with pytest.raises(ConfigError, match="tokenizer has 512 ids but model.vocab_size=256"):
    config_lib.check_vocab(model, tok.vocab_size)


def test_hf_tokenizer_reads_a_sentencepiece_conversion_as_sentencepiece(
  data_dir, spm_model, tmp_path
):
  """A tokenizer.json of Llama 2's kind (Metaspace pieces, byte fallback, </s>): export_hf's
  conversion of a SentencePiece model encodes, decodes and counts bytes as the model does."""
  from tlm_jax import export_hf

  config = make_config(data_dir, tokenizer="sentencepiece", spm_model=spm_model)
  sp = tokenizers.make_tokenizer(config.data)
  export_hf.write_tokenizer(str(tmp_path), config.data, sp, 64)
  hf = tokenizers.make_tokenizer(
    make_config(data_dir, tokenizer="hf", hf_tokenizer=str(tmp_path)).data
  )
  assert (hf.vocab_size, hf.eos_id) == (sp.vocab_size, sp.eos_id)
  np.testing.assert_array_equal(hf.bytes_per_token, sp.bytes_per_token)
  doc = builders.source(config.data, "validation")[0][:3000]
  for text in (doc, "  indented:\n\tnaïve 東京 ✓ 🙂\n"):
    np.testing.assert_array_equal(hf.encode(text), sp.encode(text))
    assert hf.decode(np.append(hf.encode(text), hf.eos_id)) == text


@pytest.mark.parametrize(
  "kind, file, field", [("sentencepiece", "m.model", "spm_model"), ("hf", "m.json", "hf_tokenizer")]
)
def test_tokenizer_cli_trains_on_the_configs_data(data_dir, tmp_path, kind, file, field):
  config_file = tmp_path / "cfg.py"
  fields = make_config(data_dir).to_dict()
  config_file.write_text(
    f"import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict({fields!r})\n"
  )
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "tlm_jax.data.tokenizers",
      f"--config={config_file}",
      f"--output={tmp_path}/tok/m",
      "--vocab_size=400",
      "--max_documents=50",
      "--max_bytes=100000",
      f"--kind={kind}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    check=True,
  )
  assert f"--config.data.tokenizer={kind} --config.data.{field}={tmp_path}/tok/{file}" in out.stdout
  trained = make_config(data_dir, tokenizer=kind, **{field: f"{tmp_path}/tok/{file}"})
  assert tokenizers.make_tokenizer(trained.data).vocab_size == 400
  assert "output" not in flags.FLAGS  # importing the module defines no flags


# --- errors -------------------------------------------------------------------


def test_config_errors_name_the_field(data_dir, tmp_path):
  def raises(match, fn, *args, **kwargs):
    with pytest.raises(ConfigError, match=match):
      fn(*args, **kwargs)

  tfds_cfg = make_config(tmp_path, source="tfds", name="no_such_dataset").data
  raises(r"data\.name.*tfds build no_such_dataset", builders.source, tfds_cfg, "train")
  raises(r"data\.name", builders.source, make_config(tmp_path, source="tfds").data, "train")
  unprepared = make_config(tmp_path, source="tfds", name="tiny_text").data
  raises(
    r"data\.name='tiny_text' is not prepared.*--file_format array_record",
    builders.source,
    unprepared,
    "train",
  )
  missing_dir = make_config(tmp_path / "nowhere", source="tfds", name="tiny_text").data
  raises(r"data\.data_dir", builders.source, missing_dir, "train")
  raises(
    r"data\.files",
    builders.source,
    make_config(tmp_path, source="local", files=f"{tmp_path}/*.nothing").data,
    "train",
  )
  (tmp_path / "one.txt").write_text("a single document")
  raises(
    r"data\.files.*at least 2",
    builders.source,
    make_config(tmp_path / "d", source="local", files=str(tmp_path / "one.txt")).data,
    "train",
  )
  raises(r"data\.source", builders.source, make_config(tmp_path, source="hf").data, "train")
  (tmp_path / "rows.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
  rows = make_config(tmp_path / "j", source="local", files=str(tmp_path / "rows.jsonl")).data
  raises(r"rows\.jsonl:2 .*data\.text_field", builders.source, rows, "train")
  raises(
    r"train\.batch_size",
    pipeline.make_iterator,
    make_config(data_dir, batch_size=6),
    "train",
    process_index=0,
    process_count=4,
  )
  no_model = make_config(data_dir, tokenizer="sentencepiece", spm_model=str(tmp_path / "no.model"))
  raises(r"data\.spm_model", pipeline.make_iterator, no_model, "train")
  no_json = make_config(data_dir, tokenizer="hf", hf_tokenizer=str(tmp_path))  # no tokenizer.json
  raises(r"data\.hf_tokenizer=.*--kind hf", pipeline.make_iterator, no_json, "train")
  raises(r"data\.tokenizer", tokenizers.make_tokenizer, make_config(data_dir, tokenizer="bpe").data)
  raises(r"split 'test'", builders.source, make_config(data_dir).data, "test")
