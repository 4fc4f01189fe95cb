"""Build a config's model, check its parameter and FLOP accounting, and run one forward pass.

    python -m tlm_jax.model --config configs/tlm_transformer.py:tiny [--json]

Reports widths, `params` counted from the built state (and the uniform twin's,
from abstract shapes), `flops_per_token` (the MFU convention: what train and
bench use) next to `xla_flops_per_token`, XLA's count of the lowered train
step (tlm_jax.metrics.xla_flops_per_token; it also counts elementwise ops, the
optimizer and the masked half of causal attention, so it sits a little above),
and the untrained next-token loss on a byte-encoded sample, which should sit
near ln(vocab_size). The count is taken before XLA compiles the step (within
~1.5% of the compiled count): compiling it, with the memory chunks unrolled,
took over 21 GB of host memory for Hope at 124m, until the OOM killer stopped it.
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

from tlm_jax import cli, metrics, state, taper
from tlm_jax import config as config_lib
from tlm_jax.model import budget, lm

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
  spec = config_lib.model_spec(config)
  residual, widths = taper.plan(spec, config_lib.tensor_parallel_size(config))
  return dict(
    widths=list(model.widths),
    layers_mode=config.model.layers_mode,
    params=lm.param_count(model),
    uniform_twin_params=twin_count,
    params_from_costs=budget.total_params(spec, widths, residual),
    flops_per_token=budget.flops_per_token(spec, widths, residual, config.train.seq_len),
    xla_flops_per_token=round(metrics.xla_flops_per_token(config, compiled=False)),
    seq_len=config.train.seq_len,
    logits_shape=list(logits_BTV.shape),
    untrained_loss=float(loss.mean()),
    log_vocab=math.log(config.model.vocab_size),
    compile_and_run_seconds=round(seconds, 3),
  )


def main(argv: Sequence[str]) -> None:
  del argv
  summary = summarize(_CONFIG.value)
  if _JSON.value:
    print(json.dumps(summary))
  else:
    print("\n".join(f"{key:>22} {value}" for key, value in summary.items()))


if __name__ == "__main__":
  from absl import flags

  _CONFIG = cli.config_flag()
  _JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of key: value lines.")
  cli.run(main)
