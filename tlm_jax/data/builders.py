"""Where the text comes from: a built-in offline corpus, the user's files (text, JSONL,
Parquet) or a TFDS dataset.

All three are read the same way, as ArrayRecord files through `tfds.data_source`,
so Grain gets random access (global shuffles, resumable positions) for free.
The built-in and local datasets are built into `data.data_dir` on first use; a
`data.source='tfds'` dataset must already be prepared there: nothing here
downloads.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import platform
import sysconfig
from collections.abc import Iterator, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath

from tlm_jax.errors import ConfigError

SOURCES = ("builtin", "local", "tfds")
# Share of documents (by content hash) held out for validation; at least one.
VALIDATION_FRACTION = 0.02
# Stdlib folders left out of the built-in corpus: third-party code, tests,
# generated codec tables, and pydoc_data (its text is taken as prose instead).
_SKIPPED_STDLIB_DIRS = frozenset(
  {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"}
)


def _hash(text: str) -> int:
  return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:16], 16)


def _fingerprint(parts: Sequence[Any]) -> str:
  """A short hash naming a dataset built from these inputs: different inputs never share files."""
  return hashlib.sha256(repr(list(parts)).encode("utf-8")).hexdigest()[:10]


class _TextBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """One `text` feature, split by content hash: stable, and duplicates never leak across."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _documents(self) -> Iterator[tuple[str, str]]:
    """(unique key, text) for every document, in a fixed order."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.builder_config.description,
      features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    hashes = {key: _hash(text) for key, text in self._documents()}
    if len(hashes) < 2:
      raise ConfigError(
        f"data.files gives {len(hashes)} document(s); train and validation need at least 2. "
        "Split the text into several files or use .jsonl with one document per line."
      )
    cut = int(VALIDATION_FRACTION * 2**64)
    held_out = {key for key, h in hashes.items() if h < cut} or {min(hashes, key=hashes.get)}
    return {
      "train": self._generate_examples(held_out, False),
      "validation": self._generate_examples(held_out, True),
    }

  def _generate_examples(self, held_out: set[str], validation: bool):
    for key, text in self._documents():
      if (key in held_out) == validation:
        yield key, {"text": text}


def _stdlib_files() -> tuple[str, list[str]]:
  """The stdlib root and its .py modules (relative, sorted) in the built-in corpus."""
  root = sysconfig.get_paths()["stdlib"]
  files = []
  for folder, dirs, names in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _SKIPPED_STDLIB_DIRS and not d.startswith("config-")]
    files += [os.path.relpath(os.path.join(folder, n), root) for n in names if n.endswith(".py")]
  return root, sorted(files)


class BuiltinCorpus(_TextBuilder):
  """Python's reference manual and standard library: real prose and code wherever Python is.

  Documents, in this order:
  - the 79 topics of the Python language reference (`pydoc_data.topics`, the
    text `help('if')` prints): 466 KB of English prose with examples;
  - the source of every stdlib module (.py) outside site-packages, tests,
    encodings/ (generated codec tables), pydoc_data/ and config-*/ (build
    files): 609 files, 9.9 MB of documented Python.
  On CPython 3.11.7 that is 688 documents: train 679 (10.3 MB), validation 9
  (100 KB, one of them prose). Building takes about half a second.

  The text depends on the Python installation, so the builder config name holds
  the Python version and a fingerprint of the stdlib file list and sizes: another
  Python builds a separate dataset instead of reusing stale files.
  """

  def _documents(self) -> Iterator[tuple[str, str]]:
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top

    for name in sorted(topics.topics):
      yield f"reference/{name}", topics.topics[name]
    root, files = _stdlib_files()
    for rel in files:
      with open(os.path.join(root, rel), encoding="utf-8") as f:
        yield f"stdlib/{rel}", f.read()


def builtin_config() -> tfds.core.BuilderConfig:
  """The BuiltinCorpus config of the running Python (version + stdlib fingerprint)."""
  root, files = _stdlib_files()
  sizes = [(rel, os.path.getsize(os.path.join(root, rel))) for rel in files]
  version = platform.python_version()
  return tfds.core.BuilderConfig(
    name=f"python{version}-{_fingerprint(sizes)}",
    description=f"Python {version} reference topics and stdlib sources from {root}.",
  )


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
  paths: tuple[str, ...] = ()
  text_field: str = "text"


class LocalFiles(_TextBuilder):
  """The user's files: each .jsonl line and each .parquet row is a document, any other
  (UTF-8) file is one document.

  A .jsonl line is a JSON object whose `data.text_field` holds the text; a Parquet
  file's text is its `data.text_field` column, read one row group at a time (a shard
  may be gigabytes). A document's key is its file's number in the sorted path
  list and its number in that file, so the same text as JSONL or as Parquet is stored,
  split and shuffled the same way. The config name is a fingerprint of the paths,
  sizes, modification times and text field, so a different (or edited) file set builds
  anew.
  """

  VERSION = tfds.core.Version("1.1.0")
  SUPPORTED_VERSIONS = [tfds.core.Version("1.0.0")]  # read where built (build_if_needed)
  RELEASE_NOTES = {
    "1.0.0": "First release.",
    "1.1.0": "Parquet files; documents keyed by file and document number, not by path.",
  }

  def _documents(self) -> Iterator[tuple[str, str]]:
    field = self.builder_config.text_field
    for file_number, path in enumerate(self.builder_config.paths):
      for doc_number, text in enumerate(_file_texts(path, field)):
        yield f"{file_number}:{doc_number}", text


def _file_texts(path: str, field: str) -> Iterator[str]:
  if path.endswith(".parquet"):
    yield from _parquet_texts(path, field)
    return
  try:
    with open(path, encoding="utf-8") as f:
      if not path.endswith(".jsonl"):
        yield f.read()
        return
      for i, line in enumerate(f, 1):
        if line.strip():
          yield _jsonl_text(line, field, f"{path}:{i}")
  except UnicodeDecodeError as e:
    raise ConfigError(f"data.files: {path} is not UTF-8 text ({e})") from e


# Parquet rows turned into Python strings at a time.
_PARQUET_BATCH_ROWS = 1024


def _parquet_texts(path: str, field: str) -> Iterator[str]:
  """The `field` column of a Parquet file, row by row, reading one row group at a time
  (pyarrow's iter_batches held a whole 430 MB file in memory). pyarrow is imported here: it
  takes a third of a second, and only Parquet needs it."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top

  try:
    parquet = pq.ParquetFile(path)
  except pa.ArrowException as e:
    raise ConfigError(f"data.files: {path} is not a Parquet file ({e})") from e
  types = {column.name: column.type for column in parquet.schema_arrow}
  kind = types.get(field, pa.null())
  if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
    columns = ", ".join(f"{name} ({column_type})" for name, column_type in types.items())
    raise ConfigError(
      f"{path} has no text column data.text_field={field!r} (its columns: {columns}); "
      "set data.text_field to the column holding the text"
    )
  row = 0
  for group in range(parquet.num_row_groups):
    table = parquet.read_row_group(group, columns=[field])
    for batch in table.to_batches(max_chunksize=_PARQUET_BATCH_ROWS):
      for text in batch.column(0).to_pylist():
        if text is None:
          raise ConfigError(f"{path} row {row}: {field!r} is null; drop the rows without text")
        yield text
        row += 1


def _jsonl_text(line: str, field: str, where: str) -> str:
  try:
    text = json.loads(line).get(field)
  except (json.JSONDecodeError, AttributeError):  # not JSON, or not an object
    text = None
  if not isinstance(text, str):
    raise ConfigError(
      f"{where} is not a JSON object with a string {field!r}; "
      "set data.text_field to the JSONL key holding the text"
    )
  return text


def local_config(files: str | Sequence[str], text_field: str) -> LocalFilesConfig:
  """The LocalFiles config for `data.files`: a glob, comma-separated globs or a list of globs."""
  patterns = files.split(",") if isinstance(files, str) else list(files)
  paths = sorted(
    {
      os.path.abspath(p)
      for pat in patterns
      if pat.strip()
      for p in glob.glob(os.path.expanduser(pat.strip()), recursive=True)
      if os.path.isfile(p)
    }
  )
  if not paths:
    raise ConfigError(
      f"data.files={files!r} matches no file; give globs of .txt/.jsonl/.parquet files, "
      "e.g. --config.data.files='corpus/*.txt,more/*.jsonl,shards/*.parquet'"
    )
  stats = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths]
  shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
  return LocalFilesConfig(
    name=f"files-{_fingerprint([text_field, *stats])}",
    paths=tuple(paths),
    text_field=text_field,
    description=f"{len(paths)} local file(s): {shown}",
  )


def build_if_needed(data_cfg: Any) -> tfds.core.DatasetBuilder:
  """The builtin/local dataset's builder, prepared as ArrayRecord in `data.data_dir` once."""
  data_dir = data_cfg.data_dir or None
  if data_cfg.source == "builtin":
    builder = BuiltinCorpus(config=builtin_config(), data_dir=data_dir)
  elif data_cfg.source == "local":
    config = local_config(data_cfg.files, data_cfg.text_field)
    builder = LocalFiles(config=config, data_dir=data_dir)
    before = LocalFiles(config=config, data_dir=data_dir, version="1.0.0")
    if not builder.is_prepared() and before.is_prepared():
      builder = before  # a run started on a 1.0.0 build resumes over the same order
  else:
    raise ConfigError(
      f"data.source={data_cfg.source!r} has nothing to build; use 'builtin' or 'local'"
    )
  if not builder.is_prepared():
    try:
      builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
    except OSError:
      if not builder.is_prepared():  # else another process sharing data_dir finished first
        raise
  return builder


def _prepared_builder(data_cfg: Any) -> tfds.core.DatasetBuilder:
  """An already-prepared TFDS dataset `data.name` in `data.data_dir`; never downloads."""
  name, data_dir = data_cfg.name, data_cfg.data_dir or None
  where = data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
  how = (
    f"prepare it first: `tfds build {name or 'NAME'} --data_dir {where} --file_format array_record`"
  )
  if not name:
    raise ConfigError(
      f"data.name is empty; with data.source='tfds' name a prepared dataset (e.g. 'lm1b'); {how}"
    )
  if data_dir and not epath.Path(data_dir).exists():
    raise ConfigError(
      f"data.data_dir={data_dir!r} does not exist; point it at your TFDS data_dir or {how}"
    )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ConfigError(
      f"data.name={name!r} is not a known or prepared TFDS dataset in {where}; {how}"
    ) from e
  if not builder.is_prepared():
    raise ConfigError(f"data.name={name!r} is not prepared in data.data_dir={where!r}; {how}")
  if not builder.info.available_file_formats() & set(tfds.core.FileFormat.with_random_access()):
    raise ConfigError(
      f"data.name={name!r} is prepared as {builder.info.file_format} in {where}; Grain needs "
      "random access: rebuild it with --file_format array_record"
    )
  if data_cfg.text_field not in builder.info.features:
    raise ConfigError(
      f"data.text_field={data_cfg.text_field!r} is not a feature of {name}; "
      f"it has {sorted(builder.info.features)}"
    )
  return builder


@dataclasses.dataclass(frozen=True, eq=False)
class TextSource:
  """One split's documents as str, by index; a stable repr, since Grain's set_state checks it."""

  records: Sequence[dict[str, Any]]
  field: str
  name: str

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, index: int) -> str:
    return self.records[index][self.field].decode("utf-8")

  def __iter__(self) -> Iterator[str]:
    return (self[i] for i in range(len(self)))

  def __repr__(self) -> str:
    return f"TextSource({self.name!r}, field={self.field!r}, len={len(self)})"


def source(data_cfg: Any, split: str) -> TextSource:
  """Random access to `split` ('train', 'validation' or any TFDS split string) of `data`."""
  if data_cfg.source not in SOURCES:
    raise ConfigError(f"data.source={data_cfg.source!r} is unknown; use one of {SOURCES}")
  if data_cfg.source == "tfds":
    builder, field = _prepared_builder(data_cfg), data_cfg.text_field
  else:
    builder, field = build_if_needed(data_cfg), "text"
  if split.split("[")[0] not in builder.info.splits:
    raise ConfigError(
      f"split {split!r} is not in {builder.info.full_name} (it has "
      f"{sorted(builder.info.splits)}); choose another, e.g. data.eval_split='test'"
    )
  records = builder.as_data_source(split=split)
  return TextSource(records, field, f"{builder.info.full_name}:{split}")
