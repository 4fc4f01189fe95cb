"""Hope-attention: softmax attention followed by a Continuum Memory System, tapered.

    --config configs/tlm_hope_attention.py:SCALE[,TAPER]
SCALE: tiny | 124m | 440m | 760m | 1.3b (default 760m). TAPER as in tlm_transformer.py.
The taper sets each layer's total CMS width; model.hope.width_fractions
(quarters by default) split it exactly over the levels (tlm_jax/model/hope.py),
so the taper rounds to 4 x the level tile and the base width is rounded up to
that. The sequence length must be a multiple of every non-zero chunk size.
"""

from tlm_jax import config as config_lib


def get_config(arg=None):
  scale, taper = config_lib.parse_arg(arg, default_scale="760m")
  config = config_lib.experiment(scale, taper, backbone="hope_attention")
  m = config.model
  m.hope.level_tile = m.taper.tile
  m.taper.tile = 4 * m.hope.level_tile
  m.mlp_width = -(-m.mlp_width // m.taper.tile) * m.taper.tile
  if scale == "tiny":  # short chunks for short CPU sequences
    m.hope.chunk_sizes = (8, 16, 0)
  return config
