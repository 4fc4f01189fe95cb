"""Orbax checkpoints holding the train state and the Grain iterator position together.

Saves are async and atomic (Orbax writes to a temporary folder and renames),
so a run killed mid-save keeps its previous checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import orbax.checkpoint as ocp

from tlm_jax.errors import ConfigError


class Checkpointer:

  def __init__(self, directory: str, keep: int):
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not (os.path.isdir(directory) and os.access(directory, os.R_OK | os.W_OK | os.X_OK)):
      raise ConfigError(
          f"checkpoint directory {directory} is not a readable, writable folder; "
          "fix its permissions or choose another --workdir")
    self.manager = ocp.CheckpointManager(
        directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any, force: bool = False) -> bool:
    return self.manager.save(
        step, force=force,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                data=grain.checkpoint.CheckpointSave(data_iter)))

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None = None) -> Any:
    """The saved state laid out as `abstract_state` (its shardings: any mesh works)."""
    args = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iter is not None:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    except (FileNotFoundError, ValueError, KeyError) as e:
      raise ConfigError(
          f"checkpoint {step} in {self.manager.directory} could not be read ({e}); it does "
          "not match this config's model, or it is damaged: use another --workdir") from e
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
