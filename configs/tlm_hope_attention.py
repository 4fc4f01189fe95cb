"""Hope-attention: softmax attention followed by a Continuum Memory System, tapered.

    --config configs/tlm_hope_attention.py:SCALE[,TAPER[,RECIPE]]
SCALE: tiny | 124m | 440m | 760m | 1.3b (default 760m). TAPER, RECIPE as in tlm_transformer.py.
The taper sets each layer's total CMS width in the taper's own tile steps;
each in-context level gets its model.hope.width_fractions share rounded to
the level tile, the slow level the rest (tlm_jax/model/hope.py). Any sequence
length works: a level pads its last chunk.
"""

from tlm_jax import presets


def get_config(arg=None):
  scale, taper, recipe = presets.parse_arg(arg, default_scale="760m")
  config = presets.experiment(scale, taper, backbone="hope_attention", recipe=recipe)
  m = config.model
  m.hope.level_tile = m.taper.tile
  if scale == "tiny":  # short chunks for short CPU sequences
    m.hope.chunk_sizes = (8, 16, 0)
  return config
