"""Titans (memory as a gate, sliding-window attention) with a tapered MLP.

    --config configs/tlm_titans.py:SCALE[,TAPER] [--config.model.titans.variant=mal]
SCALE: tiny | 124m | 440m | 760m | 1.3b (default 760m). TAPER as in tlm_transformer.py.
The sequence length must be a multiple of model.titans.chunk_size.
"""

from tlm_jax import config as config_lib


def get_config(arg=None):
  config = config_lib.experiment(arg, backbone="titans", default_scale="760m")
  tiny = config.model.d_model <= 64
  config.model.attention_window = 16 if tiny else 512
  config.model.persistent_tokens = 4 if tiny else 16
  config.model.titans.chunk_size = 16 if tiny else 64
  config.model.titans.memory_width = 32 if tiny else 4 * (config.model.d_model // config.model.num_heads)
  return config
