"""Text <-> token ids: raw UTF-8 bytes, a SentencePiece model, or a Hugging Face
`tokenizer.json` (the `tokenizers` library), the last two trainable on the config's data.

All three expose `vocab_size`, `eos_id` (the document separator the packer
appends; no BOS is added, the separator marks where a document starts),
`encode`, `decode` and `bytes_per_token`, the UTF-8 bytes each id stands for,
so evaluation can turn a loss in nats/token into bits per byte.

Train a SentencePiece model (PREFIX.model) or a byte-level BPE tokenizer.json
(--kind=hf: PREFIX.json) on the training split of a config's data:

    python -m tlm_jax.data.tokenizers --config configs/tlm_transformer.py:tiny \
        --output /tmp/spm/tiny --vocab_size 4096 [--kind hf]
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import sentencepiece as spm
import tokenizers as hf
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


def hf_file(path: str) -> str:
  """`data.hf_tokenizer`'s tokenizer.json: the path itself, or the one in that folder."""
  return str(epath.Path(path) / "tokenizer.json") if epath.Path(path).is_dir() else path


# End-of-text tokens of common tokenizer.json files (GPT-2 and most BPEs, Llama 3, Llama 2
# and SentencePiece conversions, Gemma), looked for in this order.
END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback piece


class HFTokenizer:
  """A Hugging Face `tokenizers` tokenizer.json (local path or gs://; a folder holding one).

  eos_id is its first END_OF_TEXT token. Encoding adds no special tokens (no BOS, no
  template) and reads special tokens written in the text as text, so a document cannot
  fake a separator. bytes_per_token: byte-level BPEs (GPT-2 style) map each byte to one
  character, so a token's length; otherwise a piece's UTF-8 length with '▁' counted as a
  space and byte-fallback pieces 1; added tokens their text's length; the separator 1 (as
  for bytes); unknown 1 (at least one character was there); other special tokens 0. As
  for SentencePiece, tokenizers that prepend '▁' to a text (Llama 2's) count one byte more
  per encoded text.
  """

  def __init__(self, path: str):
    self._tokenizer = tok = hf.Tokenizer.from_str(epath.Path(hf_file(path)).read_text())
    tok.encode_special_tokens = True
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    eos = [tok.token_to_id(t) for t in END_OF_TEXT if tok.token_to_id(t) is not None]
    if not eos:
      raise ConfigError(
        f"data.hf_tokenizer={path!r} has none of the end-of-text tokens {END_OF_TEXT} that "
        "separate documents; train one with `python -m tlm_jax.data.tokenizers --kind hf`"
      )
    self.eos_id = eos[0]
    spec = json.loads(tok.to_str())
    decoder = spec.get("decoder") or {}
    byte_level = "ByteLevel" in [d.get("type") for d in [decoder, *decoder.get("decoders", [])]]
    unknown = spec["model"].get("unk_token")
    added = tok.get_added_tokens_decoder()
    sizes = []
    for i in range(self.vocab_size):
      piece = tok.id_to_token(i) or ""
      if i == self.eos_id or piece == unknown or _BYTE_PIECE.fullmatch(piece):
        sizes.append(1)
      elif i in added:
        sizes.append(0 if added[i].special else len(added[i].content.encode("utf-8")))
      elif byte_level:
        sizes.append(len(piece))
      else:
        sizes.append(len(piece.replace(_META_SPACE, " ").encode("utf-8")))
    self.bytes_per_token = np.array(sizes, np.int32)

  def __setstate__(self, state: dict[str, Any]) -> None:
    """Unpickled (Grain's worker processes get copies): pickling drops that setting."""
    self.__dict__.update(state)
    self._tokenizer.encode_special_tokens = True

  def encode(self, text: str) -> np.ndarray:
    # The batch call without character offsets: a quarter more tokens per CPU second.
    (encoding,) = self._tokenizer.encode_batch_fast([text], add_special_tokens=False)
    return np.array(encoding.ids, np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    """Special ids (the separator among them) decode to nothing."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


Tokenizer = ByteTokenizer | SentencePieceTokenizer | HFTokenizer


def make_tokenizer(data_cfg: Any) -> Tokenizer:
  """The tokenizer named by `data.tokenizer`: 'byte', 'sentencepiece' (`data.spm_model`) or
  'hf' (`data.hf_tokenizer`)."""
  if data_cfg.tokenizer == "byte":
    return ByteTokenizer()
  if data_cfg.tokenizer == "hf":
    path = data_cfg.hf_tokenizer
    if not path or not epath.Path(hf_file(path)).exists():
      raise ConfigError(
        f"data.hf_tokenizer={path!r} is not a tokenizer.json file; train one with "
        "`python -m tlm_jax.data.tokenizers --config CONFIG --output PREFIX --vocab_size N "
        "--kind hf` and set data.hf_tokenizer=PREFIX.json"
      )
    return HFTokenizer(path)
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


def _up_to_bytes(texts: Iterable[str], max_bytes: int) -> Iterator[str]:
  total = 0
  for text in texts:
    yield text
    total += len(text.encode("utf-8"))
    if total >= max_bytes:
      return


def train_hf(
  texts: Iterable[str], model_prefix: str, vocab_size: int, *, max_bytes: int = 100_000_000
) -> str:
  """Trains a byte-level BPE tokenizer.json (GPT-2's scheme) that round-trips any text
  exactly; returns its path, PREFIX.json.

  No normalization and no prefix space keep the text (code indentation included) as it
  is; the 256 bytes are in the vocabulary, so nothing is unknown and vocab_size must be at
  least 257. Id 0 is <|endoftext|>, the separator.
  """
  if vocab_size < 257:
    raise ConfigError(
      f"--vocab_size={vocab_size} is too small for a byte-level BPE: it needs the 256 bytes "
      "and the separator; use at least 257"
    )
  tokenizer = hf.Tokenizer(hf.models.BPE())
  tokenizer.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = hf.decoders.ByteLevel()
  trainer = hf.trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[END_OF_TEXT[0]],
    initial_alphabet=hf.pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tokenizer.train_from_iterator(_up_to_bytes(texts, max_bytes), trainer=trainer)
  path = epath.Path(f"{model_prefix}.json")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(tokenizer.to_str())
  return str(path)


def main(argv: list[str]) -> None:
  """Trains on the first --max_documents training documents of --config's data."""
  del argv
  f = flags.FLAGS
  texts = itertools.islice(builders.source(f.config.data, "train"), f.max_documents)
  if f.kind == "hf":
    path = train_hf(texts, f.output, f.vocab_size, max_bytes=f.max_bytes)
    fields = f"--config.data.tokenizer=hf --config.data.hf_tokenizer={path}"
  else:
    path = train_sentencepiece(texts, f.output, f.vocab_size, max_bytes=f.max_bytes)
    fields = f"--config.data.tokenizer=sentencepiece --config.data.spm_model={path}"
  print(f"wrote {path}; train with {fields} --config.model.vocab_size={f.vocab_size}")


if __name__ == "__main__":
  cli.config_flag()
  flags.DEFINE_enum(
    "kind", "sentencepiece", ["sentencepiece", "hf"], "SentencePiece, or a byte-level BPE."
  )
  flags.DEFINE_string(
    "output",
    None,
    "Prefix: writes PREFIX.model (sentencepiece) or PREFIX.json (hf).",
    required=True,
  )
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
