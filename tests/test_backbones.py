"""Every backbone: its own reference check, causality, modes, parity, sharding and training."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from helpers import forward, run_steps
from tlm_jax import state, taper, train
from tlm_jax.config import model_spec
from tlm_jax.data import pipeline
from tlm_jax.model import budget, lm
from tlm_jax.workdir import read_metrics

BACKBONES = ("transformer", "gated_attention", "titans", "hope_attention")


def load(backbone, arg="tiny"):
  return helpers.load_config(f"tlm_{backbone}", arg)


def tokens(batch=2, length=16, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 256)


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_gate_saturated_open_equals_plain_attention(gate):
  gated_cfg = load("gated_attention")
  gated_cfg.model.update(gate=gate, gate_bias=True)  # the bias saturates the gate
  gated = state.build_model(gated_cfg, seed=1)
  plain = state.build_model(load("transformer"), seed=2)
  for block in gated.blocks:
    block.mixer.b_gate[...] = jnp.full_like(block.mixer.b_gate[...], 1e4)
  shared = nnx.state(gated)
  for block in shared["blocks"].values():
    del block["mixer"]["w_gate"], block["mixer"]["b_gate"]
  nnx.update(plain, shared)
  np.testing.assert_allclose(forward(gated, tokens()), forward(plain, tokens()), atol=1e-5)
  for block in gated.blocks:  # a closed gate must change the output
    block.mixer.b_gate[...] = jnp.zeros_like(block.mixer.b_gate[...])
  assert not np.allclose(forward(gated, tokens()), forward(plain, tokens()), atol=1e-3)


@pytest.mark.parametrize("gate", ["headwise", "elementwise"])
def test_gate_scales_each_head_output_as_written(gate):
  cfg = load("gated_attention")
  cfg.model.gate = gate
  mixer = state.build_model(cfg).blocks[0].mixer
  assert mixer.b_gate is None  # the reference gate has no bias
  x = jax.random.normal(jax.random.key(3), (2, 8, cfg.model.d_model))
  positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
  y = mixer.attend(x, positions)
  g = jax.nn.sigmoid(jnp.einsum("btd,d...->bt...", x, mixer.w_gate[...]))
  want = jnp.einsum(
    "btnh,nhd->btd", y * (g[..., None] if gate == "headwise" else g), mixer.w_o[...]
  )
  np.testing.assert_allclose(mixer(x, positions), want, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_no_gradient_flows_from_later_tokens(backbone):
  model = state.build_model(load(backbone))
  x = model.embed_tokens(tokens(1, 16))
  t = 5

  def loss_at_t(x_BTD):
    logits = model.unembed(model.trunk(x_BTD))
    return -jax.nn.log_softmax(logits[0, t])[3]

  grad = jax.jit(jax.grad(loss_at_t))(x)  # compiled: eagerly it costs 3-5x the CPU
  assert jnp.all(grad[0, t + 1 :] == 0.0)
  assert jnp.all(jnp.abs(grad[0, : t + 1]).sum(-1) > 0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_unrolled_equals_grouped(backbone):
  cfg = load(backbone, "tiny,stepped")
  cfg.model.taper.steps = 2
  model = state.build_model(cfg)
  unrolled = forward(model, tokens())
  lm.set_layers_mode(model, "grouped")
  assert any(len(g) > 1 for g in model.groups)
  np.testing.assert_allclose(forward(model, tokens()), unrolled, atol=1e-5)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("arg", ["tiny", "760m", "1.3b"])
def test_tapered_and_uniform_twins_have_identical_parameter_counts(backbone, arg):
  cfg = load(backbone, arg)
  count = lambda c: lm.param_count(nnx.eval_shape(lambda: state.build_model(c)))
  tapered, uniform = count(cfg), count(taper.uniform_twin(cfg))
  residual, widths = taper.plan(model_spec(cfg))
  assert tapered == uniform == budget.total_params(model_spec(cfg), widths, residual)
  report = taper.parity_report(cfg)
  assert report["param_difference"] == 0
  assert report["flops_per_token"] == report["uniform_flops_per_token"]
  assert len(set(report["widths"])) > 1


# Every backbone's tiny config, and the X-shaped residual stream (tests/test_xshape.py) with
# and without a taper: (config file, arg).
TRAINED = {
  **{backbone: (f"tlm_{backbone}", "tiny") for backbone in BACKBONES},
  "xformer_uniform": ("xformer", "tiny,uniform"),
  "xformer_cosine": ("xformer", "tiny,cosine"),
}
EIGHT = dict(data=2, fsdp=2, tensor=2)


def training_config(case, data_dir):
  """TRAINED[case] as the two tests below train it, on EIGHT devices: the train step that
  test_eight_devices_match_one compiles is the one the training test runs (the session's
  XLA cache compiles it once)."""
  cfg = helpers.load_config(*TRAINED[case])
  # Fewer layers than the tiny configs' four, for half or 3/4 of the compile: still two MLP
  # widths, and an X-shaped stream (residual widths 80, 32, 80).
  cfg.model.num_layers = 2 if case in BACKBONES else 3
  cfg.train.update(
    batch_size=8,
    seq_len=32,
    steps=100,
    warmup_steps=10,
    learning_rate=3e-3,
    log_every=50,
    eval_every=50,
    eval_batches=4,
    checkpoint_every=100,
  )
  cfg.mesh.update(EIGHT)
  cfg.data.data_dir = str(data_dir)
  return cfg


@pytest.mark.parametrize(
  "backbone,titans_variant",
  [*[(b, "mag") for b in BACKBONES], ("titans", "mal"), ("titans", "mac")],
)
def test_eight_devices_match_one(backbone, titans_variant, builtin_data_dir):
  cfg = training_config(backbone, builtin_data_dir)
  cfg.model.titans.variant = titans_variant
  batches = list(itertools.islice(pipeline.make_iterator(cfg, "train"), 2))

  eight, _ = run_steps(cfg, batches, EIGHT, jax.devices())
  one, _ = run_steps(cfg, batches, dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  np.testing.assert_allclose(eight, one, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("case", TRAINED)
def test_trains_on_the_builtin_corpus_with_falling_validation_loss(
  case, tmp_path, builtin_data_dir
):
  cfg = training_config(case, builtin_data_dir)
  result = train.train(cfg, str(tmp_path / "run"))
  evals = [r for r in read_metrics(str(tmp_path / "run")) if r.get("split")]
  assert [r["step"] for r in evals] == [50, 100]
  assert evals[1]["loss"] < evals[0]["loss"] < np.log(256)
  assert result["step"] == 100


@pytest.mark.parametrize("variant", ["mag", "mal", "mac"])
def test_titans_variants_build_and_cost_what_they_hold(variant):
  cfg = load("titans")
  cfg.model.titans.variant = variant
  model = state.build_model(cfg)
  counted = budget.total_params(model_spec(cfg), model.widths, model.residual_widths)
  assert lm.param_count(model) == counted
  assert jnp.all(jnp.isfinite(forward(model, tokens(1, 32))))


def test_titans_memory_as_context_is_causal_across_segments():
  cfg = load("titans")
  cfg.model.titans.variant = "mac"
  model = state.build_model(cfg)
  x = model.embed_tokens(tokens(1, 48))  # three segments of 16

  @jax.jit
  def grad_at(x_BTD, t):  # one compile for every t
    return jax.grad(lambda x: jnp.take(model.unembed(model.trunk(x))[0, :, 5], t))(x_BTD)

  for t in (3, 16, 37):
    grad = grad_at(x, t)
    assert jnp.all(grad[0, t + 1 :] == 0.0)
    assert jnp.all(jnp.abs(grad[0, : t + 1]).sum(-1) > 0)  # earlier segments reach t via memory
