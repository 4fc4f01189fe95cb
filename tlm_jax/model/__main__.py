"""Build a config's model, check its parameter budget, and run one forward pass.

    python -m tlm_jax.model --config configs/tlm_transformer.py:tiny

Prints one JSON object: widths, parameters counted from the built state (and
the uniform twin's, built the same way), and the untrained next-token loss on
a byte-encoded sample, which should sit near ln(vocab_size).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from tlm_jax import cli, state, taper
from tlm_jax import config as config_lib
from tlm_jax.model import costs, lm

SAMPLE = (
  b"Tapered language models give early layers wide MLPs and late layers "
  b"narrow ones, under the same parameter and FLOP budget as a uniform model."
)


def summarize(config: ml_collections.ConfigDict) -> dict:
  model = state.build_model(config)
  twin_count = lm.param_count(nnx.eval_shape(lambda: state.build_model(taper.uniform_twin(config))))
  tokens = jnp.frombuffer(SAMPLE, jnp.uint8).astype(jnp.int32) % config.model.vocab_size
  tokens_BT = tokens[None, : min(tokens.size, config.train.seq_len)]
  graphdef, params = nnx.split(model)
  forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
  start = time.perf_counter()
  logits_BTV = forward(params, tokens_BT).block_until_ready()
  seconds = time.perf_counter() - start
  loss = optax.softmax_cross_entropy_with_integer_labels(logits_BTV[:, :-1], tokens_BT[:, 1:])
  return dict(
    widths=list(model.widths),
    layers_mode=config.model.layers_mode,
    params=lm.param_count(model),
    uniform_twin_params=twin_count,
    params_from_costs=costs.total_params(config_lib.model_spec(config), list(model.widths)),
    logits_shape=list(logits_BTV.shape),
    untrained_loss=float(loss.mean()),
    log_vocab=math.log(config.model.vocab_size),
    compile_and_run_seconds=round(seconds, 3),
  )


def main(argv: Sequence[str]) -> None:
  del argv
  print(json.dumps(summarize(_CONFIG.value), indent=1))


if __name__ == "__main__":
  _CONFIG = cli.config_flag()
  cli.run(main)
