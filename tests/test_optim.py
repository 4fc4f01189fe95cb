"""Learning-rate schedules and the weight-decay mask."""

import jax.numpy as jnp
import ml_collections
import pytest

from tlm_jax import optim
from tlm_jax.config import LR_SCHEDULES, base_config, validate_train
from tlm_jax.errors import ConfigError


def train_config(**overrides) -> ml_collections.ConfigDict:
  tcfg = base_config().train
  tcfg.update(
    {
      **dict(steps=100, warmup_steps=10, learning_rate=1.0, min_lr_ratio=0.1, decay_fraction=0.2),
      **overrides,
    }
  )
  return tcfg


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_every_schedule_warms_up_linearly_to_the_peak(schedule):
  lr = optim.learning_rate_schedule(train_config(lr_schedule=schedule))
  assert float(lr(0)) == 0.0
  assert float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)


def test_cosine_decays_to_the_floor():
  lr = optim.learning_rate_schedule(train_config(lr_schedule="cosine"))
  assert float(lr(55)) == pytest.approx(0.55, abs=1e-6)  # halfway: (1 + 0.1) / 2
  assert float(lr(100)) == pytest.approx(0.1)


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_fifth():
  lr = optim.learning_rate_schedule(train_config(lr_schedule="wsd"))
  assert float(lr(79)) == pytest.approx(1.0)
  assert float(lr(90)) == pytest.approx(0.55)
  assert float(lr(100)) == pytest.approx(0.1)


def test_constant_stays_at_the_peak():
  lr = optim.learning_rate_schedule(train_config(lr_schedule="constant"))
  assert float(lr(99)) == pytest.approx(1.0)


def test_bad_schedule_settings_name_the_field():
  with pytest.raises(ConfigError, match="train.lr_schedule"):
    validate_train(train_config(lr_schedule="step"))
  with pytest.raises(ConfigError, match="train.warmup_steps"):
    validate_train(train_config(warmup_steps=100))


def test_weight_decay_skips_norm_scales_and_biases():
  params = {
    "w_q": jnp.ones((2, 3)),
    "norm": {"scale": jnp.ones(3)},
    "b_gate": jnp.ones((2, 2)),
    "embed": jnp.ones((4, 2)),
  }
  mask = optim.decay_mask(params)
  assert mask == {"w_q": True, "norm": {"scale": False}, "b_gate": False, "embed": True}
