"""Llama-style Transformer with a tapered MLP (TLM, PAPERS.md section 1).

    --config configs/tlm_transformer.py:SCALE[,TAPER]
SCALE: tiny | 124m | 440m | 760m | 1.3b (default 124m).
TAPER: cosine (default, 1.5 -> 0.5) | uniform | reverse | linear | sigmoid |
       early | middle | late (the thirds experiment) | stepped.
"""

from tlm_jax import config as config_lib


def get_config(arg=None):
  scale, taper = config_lib.parse_arg(arg, default_scale="124m")
  config = config_lib.base_config()
  config_lib.apply_scale(config, scale)
  config_lib.apply_taper(config, taper)
  if scale == "tiny":
    config.model.dtype = "float32"
    config.train.seq_len = 128
  return config
