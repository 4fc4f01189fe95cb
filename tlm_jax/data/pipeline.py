"""Documents -> packed next-token batches for one process, resumable from a checkpoint (Grain).

    source (ArrayRecord, random access) -> shuffle, reshuffled each epoch
    (train splits only) -> repeat -> tokenize, append the separator ->
    concatenate and cut into windows of seq_len + 1 tokens -> inputs =
    window[:-1], targets = window[1:] -> global batch -> this process's rows.

Every process builds the same global batch and keeps its own slice of rows,
so the data a run sees does not depend on how many hosts it runs on: a run
on 2 hosts matches a run on 1, and a resumed run may change host count.
The price is that each host tokenizes the whole global batch (the byte
tokenizer does ~8M tokens/s; use data.worker_count for SentencePiece and
tokenizer.json BPEs, each under 1M tokens per CPU second). At pod
scale, `data.pretokenized=True` keeps the guarantee while each host reads only
its own rows of windows packed once by `tlm_jax.data.pretokenize`.

Documents longer than a window continue in the next one; no padding, nothing
dropped except the short tail of a finite stream. The iterator's
get_state()/set_state() (and grain.checkpoint.CheckpointSave/CheckpointRestore
inside an Orbax checkpoint) resume it bit-identically.
"""

from __future__ import annotations

import functools
from typing import Any

import grain
import numpy as np

from tlm_jax.data import builders, pretokenize, tokenizers
from tlm_jax.errors import ConfigError


def _tokenize(tokenizer: tokenizers.Tokenizer, text: str) -> dict[str, np.ndarray]:
  return {"tokens": np.append(tokenizer.encode(text), np.int32(tokenizer.eos_id))}


def _is_full(window: dict[str, np.ndarray]) -> bool:
  """False only for the last window of a finite stream, which the packer pads with zeros."""
  return bool(window["tokens_segment_ids"][-1])


def _inputs_targets(window: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  tokens = window["tokens"]
  return {"inputs": tokens[:-1], "targets": tokens[1:]}


def make_iterator(
  config: Any,
  split: str,
  *,
  process_index: int = 0,
  process_count: int = 1,
  num_epochs: int | None = None,
) -> grain.DatasetIterator:
  """Batches {'inputs', 'targets'}: int32 (batch_size // process_count, seq_len) for this process.

  Processes get disjoint rows of the same global batch. The order depends only
  on config.seed (train splits are shuffled, others keep their stored order,
  so every validation stream is the same). num_epochs=None
  repeats forever: evaluate on a fixed number of batches with
  itertools.islice(make_iterator(config, 'validation'), n), which never runs dry
  on any process; num_epochs=1 gives one pass (its length differs by process).
  data.worker_count > 0 prefetches in that many Grain worker processes: one
  gives the same batches, more give another deterministic order (keep it fixed
  across restarts of a run). Workers need absl flags parsed, as under app.run.
  """
  batch_size = config.train.batch_size
  if batch_size % process_count:
    raise ConfigError(
      f"train.batch_size={batch_size} must be divisible by the {process_count} processes; "
      f"use a multiple of {process_count}"
    )
  rows = slice(
    process_index * batch_size // process_count, (process_index + 1) * batch_size // process_count
  )
  if config.data.pretokenized:
    batches = _pretokenized_batches(config, split, rows, num_epochs)
  else:
    batches = _streamed_batches(config, split, rows, num_epochs)
  if config.data.worker_count:
    options = grain.MultiprocessingOptions(num_workers=config.data.worker_count)
    batches = batches.mp_prefetch(options)
  return iter(batches)


def _streamed_batches(
  config: Any, split: str, rows: slice, num_epochs: int | None
) -> grain.IterDataset:
  """Every process tokenizes and packs the whole global batch, then keeps its rows."""
  batch_size, seq_len = config.train.batch_size, config.train.seq_len
  tokenizer = tokenizers.make_tokenizer(config.data)
  docs = grain.MapDataset.source(builders.source(config.data, split))
  if split.startswith("train"):
    docs = docs.shuffle(seed=config.seed % 2**32)
  docs = docs.repeat(num_epochs).map(functools.partial(_tokenize, tokenizer))
  windows = grain.experimental.ConcatThenSplitIterDataset(
    docs.to_iter_dataset(), length_struct={"tokens": seq_len + 1}
  )
  if num_epochs is not None:
    windows = windows.filter(_is_full)
  batches = windows.map(_inputs_targets).batch(batch_size, drop_remainder=True)
  return batches.map(lambda batch: {k: v[rows] for k, v in batch.items()})


def _pretokenized_batches(
  config: Any, split: str, rows: slice, num_epochs: int | None
) -> grain.IterDataset:
  """Global batches of window indices; each process reads only its rows (pretokenize.py)."""
  windows = pretokenize.open_windows(config, split)
  indices = grain.MapDataset.range(len(windows))
  if split.startswith("train"):
    indices = indices.shuffle(seed=config.seed % 2**32)
  batches = indices.repeat(num_epochs).batch(config.train.batch_size, drop_remainder=True)

  def read(batch_indices: np.ndarray) -> dict[str, np.ndarray]:
    tokens = windows.read(batch_indices[rows])
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}

  return batches.map(read).to_iter_dataset()
