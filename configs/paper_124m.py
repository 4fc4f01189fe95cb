"""The paper's recipe at 124m scaled down to one GPU, for `launch/sweep.py --preset paper_124m`.

    --config configs/paper_124m.py:BACKBONE[,TAPER]    (TAPER default cosine)

The recipe of `RECIPE=paper` (AdamW 4e-4, cosine to 0.1x, weight decay 0.1, a 32K
SentencePiece tokenizer given as data.spm_model) on 1024-token windows in batches of 32
(the shape the 124m throughput in BENCHMARKS.md is measured at) for 15,000 steps: 0.49B
tokens a run, 4 per parameter where the paper's 124m budget is 20 (presets.PAPER_TOKENS),
with the warmup scaled by the same batch ratio.
"""

from tlm_jax import presets
from tlm_jax.errors import ConfigError, did_you_mean
from tlm_jax.model import registry


def get_config(arg=None):
  backbone, _, taper = (arg or "transformer").partition(",")
  if backbone not in registry.BACKBONES:
    raise ConfigError(
      f"BACKBONE {backbone!r} is unknown{did_you_mean(backbone, registry.BACKBONES)}; "
      f"the arg is BACKBONE[,TAPER] with BACKBONE in {list(registry.BACKBONES)}"
    )
  config = presets.experiment("124m", taper or "cosine", backbone, recipe="paper")
  config.train.update(seq_len=1024, batch_size=32, grad_accum=1, steps=15_000, warmup_steps=750)
  return config
