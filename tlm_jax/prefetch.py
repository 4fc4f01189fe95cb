"""The next global batches, fetched on a background thread while the current step runs.

Reading and tokenizing a batch, then placing it on the devices, would
otherwise sit between every two steps. The thread stays `depth` batches ahead,
so the Grain iterator is ahead of training too: each batch comes with the
iterator state just after it, and a checkpoint saves that state
(`IteratorState`), never the live iterator's. Results do not change: the same
batches arrive in the same order, and a resumed run restores the state of the
last batch trained on.
"""

from __future__ import annotations

import json
import queue
import threading
from typing import Any

import jax
from jax.sharding import NamedSharding

from tlm_jax import sharding

_DONE = object()


class IteratorState:
  """A data iterator's state at one point; Grain's checkpoint handler saves it exactly as it
  saves a live iterator (JSON, one file per process)."""

  def __init__(self, state: dict[str, Any]):
    self.state = state

  def get_state(self) -> bytes:
    return json.dumps(self.state, indent=4).encode()


def batches(data_iter: Any, batch_sharding: NamedSharding, depth: int) -> Any:
  """(global batch, IteratorState after it), `depth` batches ahead on a thread (0: none)."""
  if depth:
    return Prefetcher(data_iter, batch_sharding, depth)
  return _Synchronous(data_iter, batch_sharding)


class _Synchronous:
  """The same items as Prefetcher, fetched when asked (train.prefetch=0)."""

  def __init__(self, data_iter: Any, batch_sharding: NamedSharding):
    self._data_iter, self._sharding = data_iter, batch_sharding

  def __iter__(self) -> _Synchronous:
    return self

  def __next__(self) -> tuple[dict[str, jax.Array], IteratorState]:
    local = next(self._data_iter)
    return sharding.to_global(local, self._sharding), IteratorState(self._data_iter.get_state())

  def close(self) -> None:
    pass


class Prefetcher:
  """Iterates (global batch, IteratorState after it); close() stops the thread."""

  def __init__(self, data_iter: Any, batch_sharding: NamedSharding, depth: int = 2):
    self._data_iter, self._sharding = data_iter, batch_sharding
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._fill, name="tlm_jax-prefetch", daemon=True)
    self._thread.start()

  def _put(self, item: Any) -> bool:
    """Waits for room unless stopped; False once close() was called."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _fill(self) -> None:
    try:
      for local in self._data_iter:
        state = IteratorState(self._data_iter.get_state())
        if not self._put((sharding.to_global(local, self._sharding), state)):
          return
      self._put(_DONE)
    except BaseException as e:  # raised in the training thread by __next__
      self._put(e)

  def __iter__(self) -> Prefetcher:
    return self

  def __next__(self) -> tuple[dict[str, jax.Array], IteratorState]:
    item = self._queue.get()
    if item is _DONE:
      raise StopIteration
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self) -> None:
    self._stop.set()
    self._thread.join()
