"""Text <-> token ids: raw UTF-8 bytes, or a SentencePiece model trained on the config's data.

Both tokenizers expose `vocab_size`, `eos_id` (the document separator the
packer appends), `encode`, `decode` and `bytes_per_token`, the UTF-8 bytes each
id stands for, so evaluation can turn a loss in nats/token into bits per byte.

Train a SentencePiece model on the training split of a config's data:

    python -m tlm_jax.data.tokenizers --config configs/tlm_transformer.py:tiny \
        --output /tmp/spm/tiny --vocab_size 4096
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import sentencepiece as spm
from absl import flags
from etils import epath

from tlm_jax import cli
from tlm_jax.config import TOKENIZERS
from tlm_jax.data import builders
from tlm_jax.errors import ConfigError

_META_SPACE = "\u2581"  # '▁', SentencePiece's stand-in for a space


class ByteTokenizer:
  """One id per UTF-8 byte; id 0 (NUL, stripped from input) separates documents.

  No training, no files, every text round-trips: the default for tests and
  small models. The separator counts as one byte, the newline it stands for.
  """

  vocab_size = 256
  eos_id = 0

  def __init__(self):
    self.bytes_per_token = np.ones(self.vocab_size, np.int32)

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.replace("\0", "").encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Separators are dropped; bytes cut mid-character decode as U+FFFD."""
    ids = np.asarray(ids)
    return ids[ids != self.eos_id].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class SentencePieceTokenizer:
  """A SentencePiece model (local path or gs://).

  eos_id is the model's </s>; a model without one separates documents with its
  pad id, else its unknown id. bytes_per_token: a piece's UTF-8 length with '▁'
  counted as the space it stands for; byte-fallback pieces 1; the separator 1
  (as for bytes); unknown 1 (at least one character was there); other control
  pieces 0. Models trained with a dummy prefix (most public ones, not those of
  `train_sentencepiece`) add one '▁' byte per encoded text.
  """

  def __init__(self, model_path: str):
    self._sp = sp = spm.SentencePieceProcessor(model_proto=epath.Path(model_path).read_bytes())
    self.vocab_size = sp.vocab_size()
    self.eos_id = next(i for i in (sp.eos_id(), sp.pad_id(), sp.unk_id()) if i >= 0)
    sizes = []
    for i in range(self.vocab_size):
      if i == self.eos_id or sp.is_unknown(i) or sp.is_byte(i):
        sizes.append(1)
      elif sp.is_control(i):
        sizes.append(0)
      else:
        sizes.append(len(sp.id_to_piece(i).replace(_META_SPACE, " ").encode("utf-8")))
    self.bytes_per_token = np.array(sizes, np.int32)

  def encode(self, text: str) -> np.ndarray:
    return np.array(self._sp.encode(text), np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Control ids (the separator among them) decode to nothing."""
    return self._sp.decode([int(i) for i in ids])


Tokenizer = ByteTokenizer | SentencePieceTokenizer


def make_tokenizer(data_cfg: Any) -> Tokenizer:
  """The tokenizer named by `data.tokenizer` ('byte' | 'sentencepiece' with `data.spm_model`)."""
  if data_cfg.tokenizer == "byte":
    return ByteTokenizer()
  if data_cfg.tokenizer != "sentencepiece":
    raise ConfigError(f"data.tokenizer={data_cfg.tokenizer!r} is unknown; use one of {TOKENIZERS}")
  if not data_cfg.spm_model or not epath.Path(data_cfg.spm_model).exists():
    raise ConfigError(
      f"data.spm_model={data_cfg.spm_model!r} is not a SentencePiece model file; train one with "
      "`python -m tlm_jax.data.tokenizers --config CONFIG --output PREFIX --vocab_size N` "
      "and set data.spm_model=PREFIX.model"
    )
  return SentencePieceTokenizer(data_cfg.spm_model)


def _lines(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  """Non-blank lines (SentencePiece trains on lines and skips long ones) up to max_bytes."""
  total = 0
  for text in texts:
    for line in text.split("\n"):
      if line.strip():
        yield line
        total += len(line.encode("utf-8"))
        if total >= max_bytes:
          return


def train_sentencepiece(
  texts: Iterable[str],
  model_prefix: str,
  vocab_size: int,
  *,
  max_bytes: int = 100_000_000,
  model_type: str = "bpe",
) -> str:
  """Trains a model that round-trips any text exactly; returns the .model path.

  Identity normalization, no dummy prefix and kept whitespace preserve code
  indentation; byte fallback encodes unseen characters (and newlines) as bytes,
  so vocab_size must exceed 256 + the distinct characters of the sample (~350
  for English and code). Ids: 0 <unk>, 1 </s> (the separator), then bytes.
  """
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=_lines(texts, max_bytes),
    model_writer=model,
    vocab_size=vocab_size,
    model_type=model_type,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    byte_fallback=True,
    unk_id=0,
    eos_id=1,
    bos_id=-1,
    pad_id=-1,
    minloglevel=2,
  )
  path = epath.Path(f"{model_prefix}.model")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(model.getvalue())
  return str(path)


def main(argv: list[str]) -> None:
  """Trains on the first --max_documents training documents of --config's data."""
  del argv
  f = flags.FLAGS
  texts = itertools.islice(builders.source(f.config.data, "train"), f.max_documents)
  path = train_sentencepiece(texts, f.output, f.vocab_size, max_bytes=f.max_bytes)
  print(
    f"wrote {path}; train with --config.data.tokenizer=sentencepiece "
    f"--config.data.spm_model={path} --config.model.vocab_size={f.vocab_size}"
  )


if __name__ == "__main__":
  cli.config_flag()
  flags.DEFINE_string("output", None, "Model prefix: writes PREFIX.model.", required=True)
  flags.DEFINE_integer(
    "vocab_size", 4096, "Vocabulary size (at least ~350 with byte fallback).", lower_bound=1
  )
  flags.DEFINE_integer(
    "max_documents", 1_000_000, "Train on at most this many documents.", lower_bound=1
  )
  flags.DEFINE_integer(
    "max_bytes", 100_000_000, "Train on at most this many bytes of text.", lower_bound=1
  )
  cli.run(main)
