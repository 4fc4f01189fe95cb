"""A trained workdir's latest checkpoint for the tools that do not train: evaluate, generate,
the analyses and the lm-eval adapter.

It reads the params alone: the optimizer state (AdamW's two moments, twice the
params) stays on disk, so evaluating a model takes its own size in memory, not
three times it. A checkpoint written in either model.layers_mode restores.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tlm_jax import checkpoint, sharding, state, taper
from tlm_jax import workdir as workdir_lib
from tlm_jax.data import tokenizers
from tlm_jax.errors import ConfigError
from tlm_jax.model import lm
from tlm_jax.spec import TaperSpec


@dataclasses.dataclass(frozen=True)
class Restored:
  """A workdir's latest checkpoint on the mesh its config asks for (`mesh.*`), with one block
  per layer (model.layers_mode "unrolled") whatever the run used: the tools read
  `model.blocks`."""

  workdir: str
  config: ml_collections.ConfigDict  # the workdir's, with model.layers_mode="unrolled"
  step: int
  graphdef: nnx.GraphDef
  params: Any  # nnx.State, sharded on `mesh`
  mesh: Mesh
  tokenizer: tokenizers.Tokenizer

  @property
  def model(self) -> lm.Decoder:
    """The decoder holding the restored params (shared, not copied)."""
    return nnx.merge(self.graphdef, self.params)

  @property
  def batch_sharding(self) -> NamedSharding:
    return sharding.batch_sharding(self.mesh)

  @property
  def label(self) -> str:
    """Folder name and taper, for legends: 'w (cosine)', 'w (linear 1.2->0.8)'."""
    described = taper.describe(TaperSpec.from_config(self.config.model.taper))
    return f"{os.path.basename(os.path.normpath(self.workdir))} ({described})"


def latest(workdir: str, devices: Sequence[jax.Device] | None = None) -> Restored:
  """The latest checkpoint of a training workdir, params only, on the config's mesh over
  `devices` (default: all); a one-line error when there is none."""
  config = workdir_lib.read_config(workdir)
  config.model.layers_mode = "unrolled"
  checkpoints = workdir_lib.path(workdir, workdir_lib.CHECKPOINTS)
  if not os.path.isdir(checkpoints):  # do not let Orbax create it in someone's folder
    raise ConfigError(f"no checkpoint in {checkpoints}: train this workdir first")
  mesh = sharding.make_mesh(config.mesh, None if devices is None else list(devices))
  graphdef, abstract = state.abstract_params(config, mesh)
  ckpt = checkpoint.Checkpointer(checkpoints, config.train.keep_checkpoints)
  try:
    step, restored = ckpt.restore_latest(
      dict(params=abstract), relayout=state.relayout(config, mesh, params_only=True)
    )
  finally:
    ckpt.close()
  if step is None:
    raise ConfigError(f"no checkpoint in {checkpoints}: train this workdir first")
  tokenizer = tokenizers.make_tokenizer(config.data)
  return Restored(workdir, config, step, graphdef, restored["params"], mesh, tokenizer)
