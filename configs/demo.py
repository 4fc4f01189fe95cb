"""The quick start: a small cosine-tapered Transformer on the built-in corpus, CPU-sized.

    python -m tlm_jax.train --config configs/demo.py --workdir workdirs/demo

Byte-level (vocab 256) on the offline corpus (Python reference docs and
standard-library source); a few minutes on 2 CPU cores.
"""

from tlm_jax import config as config_lib


def get_config(arg=None):
  del arg
  config = config_lib.base_config()
  m = config.model
  m.update(
    vocab_size=256,
    d_model=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    mlp_width=384,
    dtype="float32",
  )
  m.taper.update(schedule="cosine", start=1.5, end=0.5, tile=32)
  config.train.update(
    steps=600,
    batch_size=16,
    seq_len=128,
    learning_rate=3e-3,
    warmup_steps=50,
    log_every=25,
    eval_every=200,
    eval_batches=8,
    checkpoint_every=200,
  )
  config.data.source = "builtin"
  return config
