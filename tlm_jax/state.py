"""From a config and a mesh to a sharded train state and its jitted step, in one call.

`setup(config, mesh)` is the one place the runtime checks a config (every
section, and what depends on the mesh), computes the per-layer widths and
builds the model graph; train, aot, bench and the tests read its fields by
name. `abstract_params` is its params alone, checked the same way: what the
tools that do not train restore into.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tlm_jax import config as config_lib
from tlm_jax import optim, sharding, taper
from tlm_jax.errors import ConfigError
from tlm_jax.model import budget, lm
from tlm_jax.spec import ModelSpec


def build_model(config: ml_collections.ConfigDict, seed: int | None = None) -> lm.Decoder:
  """The decoder a full experiment config describes (validated), initialised from `seed`
  (default: config.seed)."""
  spec = config_lib.model_spec(config)
  residual, widths = taper.plan(spec, config_lib.tensor_parallel_size(config))
  rngs = nnx.Rngs(config.seed if seed is None else seed)
  return lm.Decoder(spec, widths, rngs=rngs, residual_widths=residual)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a loop or tool needs to run a config on a mesh.

  The state is a dict {step, bad_steps, params, opt_state}; `abstract_state`
  holds its ShapeDtypeStructs with this mesh's shardings (the target for
  restoring a checkpoint onto any mesh).
  """

  spec: ModelSpec
  widths: tuple[int, ...]  # MLP width per layer
  residual_widths: tuple[int, ...]  # residual-stream width per layer (d_model unless X-shaped)
  flops_per_token: int  # training FLOPs per token at train.seq_len
  mesh: Mesh
  graphdef: nnx.GraphDef
  init_fn: Callable[[], dict[str, Any]]  # the initial state on state_shardings (config.seed)
  train_step: Callable  # (state, batch) -> (state, {loss, grad_norm, bad_steps})
  abstract_state: dict[str, Any]
  state_shardings: dict[str, Any]
  batch_sharding: NamedSharding


def check_mesh(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """What the config asks of this mesh: the batch splits over data x fsdp per microbatch."""
  tcfg = config.train
  sharding.check_batch(tcfg.batch_size, mesh)
  parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if tcfg.batch_size % (parallel * tcfg.grad_accum):
    raise ConfigError(
      f"train.batch_size={tcfg.batch_size} must split into train.grad_accum="
      f"{tcfg.grad_accum} microbatches of a multiple of data x fsdp = {parallel}"
    )


def setup(config: ml_collections.ConfigDict, mesh: Mesh) -> Setup:
  """Check the config once, compute widths once, and build the sharded state and step."""
  spec = config_lib.validate(config)
  check_mesh(config, mesh)
  residual, widths = taper.plan(spec, config_lib.tensor_parallel_size(config))
  tx = optim.make_optimizer(config.train)

  def build() -> lm.Decoder:
    return lm.Decoder(spec, widths, rngs=nnx.Rngs(config.seed), residual_widths=residual)

  graphdef, abstract_params = nnx.split(nnx.eval_shape(build))
  param_sh = sharding.state_shardings(abstract_params, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  opt_sh = optax.tree_map_params(
    tx,
    lambda _, s: s,
    jax.eval_shape(tx.init, abstract_params),
    param_sh,
    transform_non_params=lambda _: replicated,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
  state_sh = dict(step=replicated, bad_steps=replicated, params=param_sh, opt_state=opt_sh)

  def with_optimizer(params: nnx.State) -> dict[str, Any]:
    return dict(
      step=jnp.zeros((), jnp.int32),
      bad_steps=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
    )

  finish = jax.jit(with_optimizer, out_shardings=state_sh, donate_argnums=0)

  def init() -> dict[str, Any]:
    # Built outside jit: one jit around the Python-unrolled init compiled a random generator
    # per param (minutes for a deep model on a GPU); run op by op, each draw is a small
    # compiled call (jax.random.normal's own jit) shared by the params of its shape.
    return finish(_put(nnx.state(build()), param_sh))

  abstract = _placed(jax.eval_shape(lambda: with_optimizer(nnx.state(build()))), state_sh)
  batch_sh = sharding.batch_sharding(mesh)
  return Setup(
    spec=spec,
    widths=tuple(widths),
    residual_widths=tuple(residual),
    flops_per_token=budget.flops_per_token(spec, widths, residual, config.train.seq_len),
    mesh=mesh,
    graphdef=graphdef,
    init_fn=init,
    train_step=make_train_step(graphdef, tx, config.train.grad_accum, state_sh, batch_sh),
    abstract_state=abstract,
    state_shardings=state_sh,
    batch_sharding=batch_sh,
  )


def abstract_params(config: ml_collections.ConfigDict, mesh: Mesh) -> tuple[nnx.GraphDef, Any]:
  """The decoder's graph and its params as ShapeDtypeStructs on `mesh`'s shardings, the config
  checked as `setup` checks it: what a tool that does not train restores into (no optimizer,
  nothing allocated)."""
  config_lib.validate(config)
  check_mesh(config, mesh)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: build_model(config)))
  return graphdef, _placed(params, sharding.state_shardings(params, mesh))


def _put(tree: Any, shardings: Any) -> Any:
  """Arrays built on one device as global arrays on `shardings`, through the host: every
  process built the same values, so each fills its own shards (no cross-process check)."""

  def one(x: jax.Array, s: NamedSharding) -> jax.Array:
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, s, lambda index: host[index])

  return jax.tree.map(one, tree, shardings)


def _placed(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def relayout(config: ml_collections.ConfigDict, mesh: Mesh, params_only: bool = False) -> Callable:
  """checkpoint.Relayout for a model set up from `config` on `mesh`: a checkpoint saved in the
  other model.layers_mode (its params hold `stacks`, not `blocks`, or the reverse) restores
  into that mode's abstract state (the train state, or with `params_only` the params alone),
  then params (and Adam's moments) are restacked and placed on this mode's shardings. Train
  resume and restore.latest both go through here."""

  def abstract(cfg: ml_collections.ConfigDict) -> Any:
    return (
      dict(params=abstract_params(cfg, mesh)[1]) if params_only else setup(cfg, mesh).abstract_state
    )

  def other_layout(saved: Mapping) -> tuple[Any, Callable] | None:
    mode = config.model.layers_mode
    saved_mode = "grouped" if "stacks" in saved["params"] else "unrolled"
    if saved_mode == mode:
      return None
    as_saved = config.copy_and_resolve_references()
    as_saved.model.layers_mode = saved_mode
    spec = config_lib.model_spec(config)
    residual, widths = taper.plan(spec, config_lib.tensor_parallel_size(config))
    groups = lm.layer_groups(list(zip(residual, widths)), "grouped")
    convert = lm.stack_layers if mode == "grouped" else lm.unstack_layers
    shardings = jax.tree.map(lambda x: x.sharding, abstract(config))
    return abstract(as_saved), lambda s: jax.device_put(convert(s, groups), shardings)

  return other_layout


def make_train_step(
  graphdef: nnx.GraphDef,
  tx: optax.GradientTransformation,
  grad_accum: int,
  state_sh: Any,
  batch_sh: NamedSharding,
) -> Callable:
  """jit(loss, grad (accumulated over grad_accum microbatches), AdamW), state donated.

  A step whose loss or gradient is not finite leaves params and optimizer
  state untouched and counts itself in bad_steps; the loop checks that count
  before logging and saving, and stops.
  """

  def loss_fn(params, inputs_BT, targets_BT):
    logits_BTV = nnx.merge(graphdef, params)(inputs_BT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def step(state, batch):
    params = state["params"]
    if grad_accum == 1:
      loss, grads = grad_fn(params, batch["inputs"], batch["targets"])
    else:
      # Row r goes to microbatch r % grad_accum, so each device's rows stay local.
      micro = jax.tree.map(lambda x: x.reshape(-1, grad_accum, x.shape[-1]).swapaxes(0, 1), batch)

      def add(carry, mb):
        loss_g = grad_fn(params, mb["inputs"], mb["targets"])
        return jax.tree.map(jnp.add, carry, loss_g), None

      zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
      (loss, grads), _ = jax.lax.scan(add, zero, micro)
      loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    new = (optax.apply_updates(params, updates), opt_state)
    params, opt_state = jax.tree.map(
      lambda n, o: jnp.where(ok, n, o), new, (params, state["opt_state"])
    )
    bad_steps = state["bad_steps"] + (~ok).astype(jnp.int32)
    out = dict(step=state["step"] + 1, bad_steps=bad_steps, params=params, opt_state=opt_state)
    return out, dict(loss=loss, grad_norm=grad_norm, bad_steps=bad_steps)

  return jax.jit(
    step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None), donate_argnums=0
  )
