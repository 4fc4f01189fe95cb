"""The X-shaped model (><former, PAPERS.md section 3): residual width wide early and late,
narrow mid-depth, resized between blocks without parameters; total params matched to the
uniform model by solving the base width (tlm_jax/xshape.py).

    --config configs/xformer.py:SCALE[,TAPER] [--config.model.backbone=titans ...]
SCALE: tiny | 124m | 440m | 760m | 1.3b (default 124m). TAPER defaults to uniform (the
X shape alone); `,cosine` adds the MLP taper too, the combination neither paper ran.
"""

from tlm_jax import presets


def get_config(arg=None):
  scale, taper, recipe = presets.parse_arg(arg, default_scale="124m")
  if "," not in (arg or ""):
    taper = "uniform"
  config = presets.experiment(scale, taper, backbone="transformer", recipe=recipe)
  config.model.residual.schedule = "xshape"
  if scale == "tiny":  # 16-wide steps: four whole heads of 16 (one kv head each)
    config.model.num_kv_heads = config.model.num_heads
    config.model.residual.tile = 16
  return config
