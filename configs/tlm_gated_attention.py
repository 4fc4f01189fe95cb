"""Gated Attention (Qiu et al. 2025) with a tapered MLP; elementwise gate by default.

    --config configs/tlm_gated_attention.py:SCALE[,TAPER[,RECIPE]] [--config.model.gate=headwise]
SCALE: tiny | 124m | 440m | 760m | 1.3b (default 760m). TAPER, RECIPE as in tlm_transformer.py.
"""

from tlm_jax import config as config_lib


def get_config(arg=None):
  scale, taper, recipe = config_lib.parse_arg(arg, default_scale="760m")
  return config_lib.experiment(scale, taper, backbone="gated_attention", recipe=recipe)
