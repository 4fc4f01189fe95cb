"""The one list of backbones: what each one is built from, costs, and reads (pure Python).

A block is x + mixer(norm(x)), then x + mlp(norm(x)); only the mixer and the
MLP (the part the taper sizes) differ between backbones. Everything that
depends on the backbone reads its entry here: config validation, the scale
shapes (tlm_jax/presets.py), params and FLOPs (model/budget.py), the decoder
(model/lm.py builds `mixer` and `mlp`), the report (`own_fields`), sweeps and
fit tables. Adding a backbone is its module (a mixer and/or an MLP, following
the protocols in model/backbones.py, and their cost functions) and one entry
here, plus a `configs/tlm_NAME.py` that names it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from tlm_jax.errors import ConfigError, did_you_mean
from tlm_jax.model import costs


@dataclasses.dataclass(frozen=True)
class Backbone:
  """mixer / mlp: 'module:Class' of the model layer (model/backbones.py imports them), so
  this table stays importable without JAX; both take sequences of any length (a memory pads
  its last chunk inside). own_fields: `config.model` fields only this backbone reads.
  splash: its attention masks are causal / sliding-window ones, which the splash kernel
  takes. shapes: what it changes in presets.SCALES per scale, so its uniform model lands
  within 3% of the scale's name (tests/test_taper.py checks every backbone x scale)."""

  mixer: str
  mlp: str
  costs: costs.BackboneCosts
  own_fields: tuple[str, ...] = ()
  splash: bool = True
  shapes: Mapping[str, Mapping[str, int]] = dataclasses.field(default_factory=dict)


SWIGLU = "tlm_jax.model.layers:SwiGLU"
SWIGLU_COSTS = dict(mlp_params=costs.swiglu_params, mlp_flops=costs.swiglu_flops)

# Backbones keep the scale's d_model and heads; the ones whose mixers hold a few d x d more
# per layer (the gate; Hope's value maps) give it back from the MLP width, and Titans, whose
# memory + attention + gates hold ~2.4x a Transformer's mixer, from depth (a Titans MLP
# narrowed to fit 24 layers would leave little to taper). 124m stays the GPT-2-small shape
# everywhere (the benchmarks' shape).
BACKBONES: dict[str, Backbone] = {
  "transformer": Backbone(
    mixer="tlm_jax.model.attention:Attention",
    mlp=SWIGLU,
    costs=costs.BackboneCosts(costs.attention_params, costs.attention_flops, **SWIGLU_COSTS),
    shapes={"1.3b": dict(mlp_width=5248)},  # 439M, 778M, 1.308B
  ),
  "gated_attention": Backbone(
    mixer="tlm_jax.model.attention:GatedAttention",
    mlp=SWIGLU,
    costs=costs.BackboneCosts(
      costs.gated_attention_params, costs.gated_attention_flops, **SWIGLU_COSTS
    ),
    own_fields=("gate", "gate_bias"),
    shapes={  # 435M, 764M, 1.295B
      "440m": dict(mlp_width=2304),
      "760m": dict(mlp_width=3456),
      "1.3b": dict(mlp_width=4480),
    },
  ),
  "titans": Backbone(
    mixer="tlm_jax.model.titans:Titans",
    mlp=SWIGLU,
    costs=costs.BackboneCosts(costs.titans_params, costs.titans_flops, **SWIGLU_COSTS),
    own_fields=("titans",),
    splash=False,  # its prefix and segment masks
    shapes={  # 442M, 761M, 1.298B (mag)
      "440m": dict(num_layers=21, mlp_width=2560),
      "760m": dict(num_layers=15, mlp_width=4608),
      "1.3b": dict(num_layers=15, mlp_width=6144),
    },
  ),
  "hope_attention": Backbone(
    mixer="tlm_jax.model.attention:Attention",
    mlp="tlm_jax.model.hope:CMS",
    costs=costs.BackboneCosts(
      costs.attention_params, costs.attention_flops, costs.cms_params, costs.cms_flops
    ),
    own_fields=("hope",),
    shapes={  # 443M, 764M, 1.301B
      "440m": dict(mlp_width=2048),
      "760m": dict(mlp_width=2944),
      "1.3b": dict(mlp_width=3840),
    },
  ),
}


def get(name: str) -> Backbone:
  """The entry of `model.backbone`; an unknown name is a ConfigError naming the nearest."""
  if name not in BACKBONES:
    raise ConfigError(
      f"model.backbone={name!r} is unknown{did_you_mean(name, BACKBONES)}; "
      f"use one of {list(BACKBONES)}"
    )
  return BACKBONES[name]
