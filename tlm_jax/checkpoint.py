"""Orbax checkpoints holding the train state and the Grain iterator position together.

A tool that does not train restores part of the state (the params): the rest
(AdamW's moments, twice the params) is not read.

Saves are async and atomic (Orbax writes to a temporary folder and renames),
so a run killed mid-save keeps its previous checkpoint. A checkpoint damaged
later (a truncated copy, a bad disk) is moved aside by `restore_latest`, which
goes on from the newest one that still reads.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from tlm_jax.errors import ConfigError

# Given a checkpoint's saved state tree (Orbax metadata, nested dicts): None when it restores
# into the caller's abstract state as is, else the abstract state it restores into and the
# function that turns the restored state into the caller's (a model's other layout).
Relayout = Callable[[Any], tuple[Any, Callable[[Any], Any]] | None]


def _brief(e: Exception, limit: int = 200) -> str:
  """One short line of `e`: tensorstore errors run to kilobytes of spec JSON."""
  text = str(e).strip().split("\n")[0].split(" [tensorstore_spec")[0] or "no message"
  text = f"{type(e).__name__}: {text}"
  # Keep both ends: the head says what was read, the tail why it failed.
  return text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2 :]


def _partial_restore(saved: Any, abstract_state: dict[str, Any]) -> ocp.args.PyTreeRestore:
  """Restores the parts of the saved state that `abstract_state` names; the others are not
  read. Each part must match its saved tree whole, as a full restore checks (a partial one
  would silently leave out variables the model does not have)."""
  for part, tree in abstract_state.items():
    if part not in saved.keys():
      raise ValueError(f"the checkpoint has no {part!r} (it holds {sorted(saved.keys())})")
    want, have = (set(ocp.tree.to_flat_dict(t)) for t in (tree, saved[part]))
    if want != have:
      extra = ["/".join(map(str, k)) for k in sorted(want ^ have)][:3]
      raise ValueError(f"the checkpoint's {part} and this model's differ at {extra}")
  return ocp.args.PyTreeRestore(
    item=abstract_state,
    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
    partial_restore=True,
  )


class Checkpointer:
  def __init__(self, directory: str, keep: int):
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not (
      os.path.isdir(directory) and os.access(directory, os.R_OK | os.W_OK | os.X_OK)
    ):
      raise ConfigError(
        f"checkpoint directory {directory} is not a readable, writable folder; "
        "fix its permissions or choose another --workdir"
      )
    self.directory = directory
    # Known up front, so a fresh manager can read a step's metadata before restoring. A
    # partial restore needs the PyTree handler; it reads what the standard one writes.
    handlers = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      handlers.add("state", args, ocp.StandardCheckpointHandler)
    handlers.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
    for args in (grain.checkpoint.CheckpointSave, grain.checkpoint.CheckpointRestore):
      handlers.add("data", args, grain.checkpoint.CheckpointHandler)
    self.manager = ocp.CheckpointManager(
      directory,
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      handler_registry=handlers,
    )

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
    return self.manager.save(
      step,
      force=force,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iter)
      ),
    )

  def _restore(
    self, step: int, abstract_state: Any, data_iter: Any | None, relayout: Relayout | None
  ) -> Any:
    saved = self.manager.item_metadata(step)["state"]
    other = relayout(saved) if relayout else None
    if other is not None:
      abstract_state, convert = other
    if set(abstract_state) == set(saved.keys()):
      args = dict(state=ocp.args.StandardRestore(abstract_state))
    else:
      args = dict(state=_partial_restore(saved, abstract_state))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    state = self.manager.restore(step, args=ocp.args.Composite(**args))["state"]
    return state if other is None else convert(state)

  def restore(
    self,
    step: int,
    abstract_state: Any,
    data_iter: Any | None = None,
    relayout: Relayout | None = None,
  ) -> Any:
    """The saved state laid out as `abstract_state` (its shardings: any mesh works), through
    `relayout` when the checkpoint's own layout may differ. An `abstract_state` holding only
    some of the state's parts (e.g. {"params": ...}) restores those alone."""
    try:
      return self._restore(step, abstract_state, data_iter, relayout)
    except Exception as e:  # tensorstore and Orbax raise many types for bad files
      raise ConfigError(
        f"checkpoint {step} in {self.directory} could not be read ({_brief(e)}); it does "
        "not match this config's model, or it is damaged: use another --workdir"
      ) from e

  def restore_latest(
    self, abstract_state: Any, data_iter: Any | None = None, relayout: Relayout | None = None
  ) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores; (None, None) when there is none.

    Newer checkpoints that fail are moved aside only once an older one restores:
    when none does, the config (not the files) is the likely culprit, so all stay.
    A checkpoint in another layout that `relayout` knows is converted, not a failure.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        state = self._restore(step, abstract_state, data_iter, relayout)
      except Exception as e:  # tensorstore and Orbax raise many types for bad files
        failed.append((step, _brief(e)))
        continue
      for bad, why in failed:
        where = self._move_aside(bad)
        if jax.process_index() == 0:
          print(
            f"warning: checkpoint {bad} in {self.directory} could not be restored ({why}); "
            f"it was moved to {where} and the run goes on from step {step}",
            file=sys.stderr,
            flush=True,
          )
      if failed:
        self.manager.reload()
      return step, state
    if failed:
      reasons = "; ".join(f"step {s}: {why}" for s, why in failed)
      raise ConfigError(
        f"no checkpoint in {self.directory} could be restored ({reasons}): they do not match "
        "this config's model or are damaged; use another --workdir"
      )
    return None, None

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step to `<dir>.damaged/`, where max_to_keep never deletes it.

    Out of the manager's folder, a new save of the same step cannot collide with it.
    Process 0 moves it and the others wait: this assumes the checkpoint folder is one
    shared filesystem, as Orbax itself does.
    """
    where = os.path.join(self.directory + ".damaged", str(step))
    n = 1
    while os.path.exists(where):  # the same step damaged again after a later save
      where, n = os.path.join(self.directory + ".damaged", f"{step}.{n}"), n + 1
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(where), exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), where)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"tlm_jax checkpoint {step} moved aside")
    return where

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
