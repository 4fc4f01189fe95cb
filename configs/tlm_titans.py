"""Titans (memory as a gate, sliding-window attention) with a tapered MLP.

    --config configs/tlm_titans.py:SCALE[,TAPER] [--config.model.titans.variant=mal|mac]
SCALE: tiny | 124m | 440m | 760m | 1.3b (default 760m). TAPER as in tlm_transformer.py.
Any sequence length works (the memory pads its last chunk, mac its last
segment). model.persistent_tokens learned tokens are
prepended to every sequence (mac: to every segment's attention context).
"""

from tlm_jax import presets


def get_config(arg=None):
  scale, taper, recipe = presets.parse_arg(arg, default_scale="760m")
  config = presets.experiment(scale, taper, backbone="titans", recipe=recipe)
  m, tiny = config.model, scale == "tiny"
  m.attention_window = 16 if tiny else 512
  m.persistent_tokens = 4 if tiny else 16
  m.titans.chunk_size = 16 if tiny else 64
  m.titans.segment_size = 16 if tiny else 512
  m.titans.memory_width = 32 if tiny else 4 * (m.d_model // m.num_heads)
  return config
