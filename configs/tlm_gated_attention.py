"""Gated Attention (Qiu et al. 2025) with a tapered MLP; elementwise gate by default.

    --config configs/tlm_gated_attention.py:SCALE[,TAPER[,RECIPE]] [--config.model.gate=headwise]
SCALE: tiny | 124m | 440m | 760m | 1.3b (default 760m). TAPER, RECIPE as in tlm_transformer.py.
"""

from tlm_jax import presets


def get_config(arg=None):
  scale, taper, recipe = presets.parse_arg(arg, default_scale="760m")
  return presets.experiment(scale, taper, backbone="gated_attention", recipe=recipe)
