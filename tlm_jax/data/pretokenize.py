"""Tokenize and pack a split once, so each host reads only its own rows of every batch.

    python -m tlm_jax.data.pretokenize --config C [--splits train,validation]

Streaming (the default) has every host tokenize the whole global batch, which
keeps results independent of the host count but does not shrink as hosts are
added. A pretokenized cache keeps the guarantee another way: the split's
documents are tokenized once, in stored order, joined with the separator and
cut into windows of seq_len + 1 tokens (one ArrayRecord record per window).
A global batch is then batch_size window indices drawn by a seeded shuffle of
all windows, reshuffled each epoch, and host p of P reads only its
batch_size / P rows: a read per row and no tokenization. With
`data.pretokenized=True` the pipeline reads the cache, which must be built
first (and, on several hosts, live on a filesystem they share).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence

import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath
from grain.sources import ArrayRecordDataSource

from tlm_jax import cli
from tlm_jax.data import builders, tokenizers
from tlm_jax.errors import ConfigError


def cache_dir(config: ml_collections.ConfigDict) -> str:
  """Where a config's windows live: named by the dataset, tokenizer and seq_len, so a
  change to any of them never reads stale windows."""
  data = config.data
  tokenizer = data.tokenizer
  if tokenizer != "byte":  # named by its file's content
    file = data.spm_model if tokenizer == "sentencepiece" else tokenizers.hf_file(data.hf_tokenizer)
    tokenizer = hashlib.sha256(epath.Path(file).read_bytes()).hexdigest()[:10]
  dataset = builders.source(data, "train").name.rsplit(":", 1)[0]
  key = f"{dataset}|{tokenizer}|{config.train.seq_len}"
  name = hashlib.sha256(key.encode("utf-8")).hexdigest()[:12]
  root = data.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  return os.path.join(os.path.expanduser(root), "tlm_pretokenized", name)


def pack(token_streams: Iterable[np.ndarray], window: int) -> Iterator[np.ndarray]:
  """Consecutive `window`-token slices of the streams joined end to end; the tail that
  does not fill a window is dropped (as the streaming packer drops it)."""
  buffer, size = [], 0
  for tokens in token_streams:
    buffer.append(tokens)
    size += tokens.size
    if size >= window:
      joined = np.concatenate(buffer)
      full = joined.size // window * window
      yield from joined[:full].reshape(-1, window)
      buffer, size = [joined[full:]], joined.size - full


def build(config: ml_collections.ConfigDict, splits: Sequence[str]) -> dict[str, int]:
  """Write each split's windows (skipping splits already written); windows per split."""
  tokenizer = tokenizers.make_tokenizer(config.data)
  dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
  out = epath.Path(cache_dir(config))
  out.mkdir(parents=True, exist_ok=True)
  counts = {}
  for split in splits:
    meta_path = out / f"{split}.json"
    if meta_path.exists():
      counts[split] = json.loads(meta_path.read_text())["windows"]
      continue
    docs = builders.source(config.data, split)
    streams = (np.append(tokenizer.encode(t), tokenizer.eos_id).astype(dtype) for t in docs)
    path = out / f"{split}.array_record"
    writer = ArrayRecordWriter(str(path) + ".tmp", "group_size:1")
    n = 0
    for window in pack(streams, config.train.seq_len + 1):
      writer.write(window.tobytes())
      n += 1
    writer.close()
    os.replace(str(path) + ".tmp", path)
    meta = dict(
      windows=n,
      dtype=np.dtype(dtype).name,
      seq_len=config.train.seq_len,
      source=docs.name,
      vocab_size=tokenizer.vocab_size,
    )
    meta_path.write_text(json.dumps(meta))
    counts[split] = n
  return counts


@dataclasses.dataclass(frozen=True, eq=False)
class Windows:
  """Random access to a split's packed windows as int32 arrays of seq_len + 1 tokens."""

  records: ArrayRecordDataSource
  dtype: str
  name: str

  def __len__(self) -> int:
    return len(self.records)

  def read(self, indices: np.ndarray) -> np.ndarray:
    """(len(indices), seq_len + 1) int32, one read per row."""
    rows = self.records.__getitems__([int(i) for i in indices])
    return np.stack([np.frombuffer(r, self.dtype) for r in rows]).astype(np.int32)

  def __repr__(self) -> str:
    return f"Windows({self.name!r}, len={len(self)})"


def open_windows(config: ml_collections.ConfigDict, split: str) -> Windows:
  """The cache of `split`, or a one-line error saying how to build it."""
  directory = cache_dir(config)
  meta_path = os.path.join(directory, f"{split}.json")
  if not os.path.exists(meta_path):
    raise ConfigError(
      f"data.pretokenized=True but {split!r} is not pretokenized in {directory}; build it "
      "with `python -m tlm_jax.data.pretokenize --config CONFIG` (same data, tokenizer and "
      "train.seq_len)"
    )
  with open(meta_path) as f:
    meta = json.load(f)
  records = ArrayRecordDataSource(os.path.join(directory, f"{split}.array_record"))
  return Windows(records, meta["dtype"], f"{meta['source']}@{meta['seq_len']}")


def main(argv: Sequence[str]) -> None:
  del argv
  config = _CONFIG.value
  counts = build(config, _SPLITS.value)
  print(json.dumps(dict(cache_dir=cache_dir(config), windows=counts)))


if __name__ == "__main__":
  from absl import flags

  _CONFIG = cli.config_flag()
  _SPLITS = flags.DEFINE_list("splits", ["train", "validation"], "Splits to tokenize and pack.")
  cli.run(main)
