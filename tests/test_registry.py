"""The backbone registry is the one list: a new entry is all the rest of the code needs."""

import dataclasses

import pytest

import helpers
from tlm_jax import config as config_lib
from tlm_jax import presets, report, state, taper
from tlm_jax.errors import ConfigError
from tlm_jax.model import budget, lm, registry
from tlm_jax.spec import ModelSpec


def test_an_unknown_backbone_names_the_nearest():
  cfg = helpers.load_config("tlm_transformer", "tiny")
  cfg.model.backbone = "transfomer"
  with pytest.raises(ConfigError, match=r"model.backbone='transfomer'.*did you mean 'transformer'"):
    config_lib.validate(cfg)


def test_splash_is_refused_where_the_registry_says_its_masks_do_not_fit():
  cfg = helpers.load_config("tlm_titans", "tiny")
  cfg.model.attention_impl = "splash"
  with pytest.raises(ConfigError, match=r"model.backbone='titans' takes no .*splash"):
    config_lib.validate(cfg)


def test_model_defaults_are_the_specs():
  assert config_lib.model_spec(config_lib.base_config()) == dataclasses.replace(
    ModelSpec(), head_dim=ModelSpec().d_model // ModelSpec().num_heads
  )


def test_a_new_registry_entry_is_built_counted_tapered_and_reported(monkeypatch):
  """A 'gated MLP-free' toy: gated attention's mixer with Hope's CMS, registered only here."""
  entry = registry.Backbone(
    mixer=registry.BACKBONES["gated_attention"].mixer,
    mlp=registry.BACKBONES["hope_attention"].mlp,
    costs=dataclasses.replace(
      registry.BACKBONES["gated_attention"].costs,
      mlp_params=registry.BACKBONES["hope_attention"].costs.mlp_params,
      mlp_flops=registry.BACKBONES["hope_attention"].costs.mlp_flops,
    ),
    own_fields=("gate", "gate_bias", "hope"),
    shapes={"124m": dict(mlp_width=1664)},
  )
  monkeypatch.setitem(registry.BACKBONES, "gated_hope", entry)
  cfg = presets.experiment("tiny", "cosine", backbone="gated_hope")
  cfg.model.hope.level_tile = 32

  spec = config_lib.validate(cfg)
  residual, widths = taper.plan(spec)
  model = state.build_model(cfg)
  assert lm.param_count(model) == budget.total_params(spec, widths, residual)
  parity = taper.parity_report(cfg)
  assert parity["param_difference"] == 0 and parity["total_params"] == lm.param_count(model)
  assert presets.experiment("124m", "uniform", backbone="gated_hope").model.mlp_width == 1664
  ident = report.identity(cfg, widths)
  assert "model.titans.chunk_size" not in ident and "model.hope.chunk_sizes" in ident
