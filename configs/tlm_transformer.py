"""Llama-style Transformer with a tapered MLP (TLM, PAPERS.md section 1).

    --config configs/tlm_transformer.py:SCALE[,TAPER[,RECIPE]]
SCALE: tiny | 124m | 440m | 760m | 1.3b (default 124m).
TAPER: cosine (default, 1.5 -> 0.5) | uniform | reverse | linear | sigmoid |
       early | middle | late (the thirds experiment) | stepped.
RECIPE: default | paper (4K context, 0.5M-token batches, AdamW 4e-4 cosine, wd 0.1,
        a 32K SentencePiece tokenizer given as data.spm_model; 124m and up).
"""

from tlm_jax import presets


def get_config(arg=None):
  scale, taper, recipe = presets.parse_arg(arg, default_scale="124m")
  return presets.experiment(scale, taper, backbone="transformer", recipe=recipe)
