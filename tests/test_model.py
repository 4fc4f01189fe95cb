"""Decoder tests: a plain-jnp reference, causality, layer modes, params, config errors.

Everything runs on the "tiny" scale (d_model 64, 4 layers, byte vocabulary,
float32) so the file stays fast on a CPU; larger scales are only built
abstractly (`nnx.eval_shape`), which allocates nothing.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from tlm_jax import state, taper
from tlm_jax.config import model_spec
from tlm_jax.errors import ConfigError
from tlm_jax.model import __main__ as model_cli
from tlm_jax.model import budget, lm
from tlm_jax.presets import TAPERS
from tlm_jax.spec import LAYERS_MODES

BATCH, SEQ = 2, 12
LARGE_SCALES = ("124m", "440m", "760m", "1.3b")


def load_config(arg: str = "tiny"):
  """A fresh experiment config from configs/tlm_transformer.py:ARG."""
  return helpers.load_config("tlm_transformer", arg)


def stepped_config(steps: int = 2):
  """Tiny config whose taper has `steps` distinct widths, so groups span several layers."""
  cfg = load_config("tiny,stepped")
  cfg.model.taper.steps = steps
  return cfg


def tokens_for(cfg, seed: int = 0, batch: int = BATCH, seq: int = SEQ) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (batch, seq), 0, cfg.model.vocab_size)


def randomize_params(model: nnx.Module, seed: int, std: float = 0.15) -> None:
  """Replace every param with random values (norm scales around 1, not exactly 1).

  Init leaves norm scales at one and attention nearly uniform (std 0.02), which
  would hide a dropped scale or a wrong softmax scale; these values do not.
  """
  state = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = []
  for key, leaf in zip(keys, leaves):
    noise = jax.random.normal(key, leaf.shape, leaf.dtype)
    new.append(1.0 + 0.2 * noise if leaf.ndim == 1 else std * noise)
  nnx.update(model, jax.tree.unflatten(treedef, new))


def flat_params(model: nnx.Module) -> dict:
  return {
    path: np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
  }


def num_params(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


# ---------------------------------------------------------------------------
# 1. A plain jax.numpy reference of the whole forward pass (no Flax).
# ---------------------------------------------------------------------------


def ref_rms_norm(x, scale, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def ref_rope(x_BTNH, positions_BT, theta):
  """Rotate pairs (x[i], x[i + half]) by position * theta^(-i/half), as complex numbers."""
  half = x_BTNH.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  angle_BTH = positions_BT[..., None].astype(jnp.float32) * jnp.asarray(freq, jnp.float32)
  rotation = jnp.exp(1j * angle_BTH)[:, :, None, :]
  z = (x_BTNH[..., :half] + 1j * x_BTNH[..., half:]) * rotation
  return jnp.concatenate([z.real, z.imag], axis=-1).astype(jnp.float32)


def ref_attention(x_BTD, p, positions_BT, cfg):
  num_heads, num_kv = cfg.num_heads, cfg.num_kv_heads
  hd = p["w_q"].shape[-1]
  q = ref_rope(jnp.einsum("btd,dnh->btnh", x_BTD, p["w_q"]), positions_BT, cfg.rope_theta)
  k = ref_rope(jnp.einsum("btd,dkh->btkh", x_BTD, p["w_k"]), positions_BT, cfg.rope_theta)
  v = jnp.einsum("btd,dkh->btkh", x_BTD, p["w_v"])
  # Grouped-query attention: query head n reads kv head n // (num_heads // num_kv).
  k = jnp.repeat(k, num_heads // num_kv, axis=2)
  v = jnp.repeat(v, num_heads // num_kv, axis=2)
  scores = jnp.einsum("bqnh,bknh->bnqk", q, k) / math.sqrt(hd)
  seq = x_BTD.shape[1]
  causal = np.tril(np.ones((seq, seq), bool))
  scores = jnp.where(causal, scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1)
  y = jnp.einsum("bnqk,bknh->bqnh", probs, v)
  return jnp.einsum("bqnh,nhd->bqd", y, p["w_o"])


def ref_swiglu(x_BTD, p):
  return (jax.nn.silu(x_BTD @ p["w_gate"]) * (x_BTD @ p["w_up"])) @ p["w_down"]


def reference_logits(model, cfg, tokens_BT, positions_BT=None):
  """Logits of `model` recomputed from its raw param arrays."""
  if positions_BT is None:
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
  eps = cfg.norm_eps
  embed = model.embed[...]
  x = embed[tokens_BT]
  for block in model.blocks:
    attn = {name: getattr(block.mixer, name)[...] for name in ("w_q", "w_k", "w_v", "w_o")}
    mlp = {name: getattr(block.mlp, name)[...] for name in ("w_gate", "w_up", "w_down")}
    x = x + ref_attention(
      ref_rms_norm(x, block.mixer_norm.scale[...], eps), attn, positions_BT, cfg
    )
    x = x + ref_swiglu(ref_rms_norm(x, block.mlp_norm.scale[...], eps), mlp)
  h = ref_rms_norm(x, model.final_norm.scale[...], eps)
  head = embed.T if cfg.tie_embeddings else model.head[...]
  return h @ head


@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("explicit_positions", [False, True], ids=["default_pos", "explicit_pos"])
def test_forward_matches_plain_jnp_reference(tie_embeddings, explicit_positions):
  cfg = load_config("tiny")  # cosine taper, 4 heads sharing 2 kv heads
  cfg.model.tie_embeddings = tie_embeddings
  model = state.build_model(cfg)
  assert len(set(model.widths)) == cfg.model.num_layers, "every layer should differ"
  assert cfg.model.num_kv_heads < cfg.model.num_heads
  assert (model.head is None) == tie_embeddings
  randomize_params(model, seed=1)
  tokens = tokens_for(cfg)
  positions = None
  if explicit_positions:  # an offset stream and an unordered one
    positions = jnp.stack(
      [7 + 3 * jnp.arange(SEQ), jax.random.randint(jax.random.key(5), (SEQ,), 0, 1000)]
    )

  logits = model(tokens, positions)
  expected = reference_logits(model, cfg.model, tokens, positions)

  assert logits.shape == (BATCH, SEQ, cfg.model.vocab_size)
  assert logits.dtype == jnp.float32
  assert float(jnp.std(expected)) > 0.1  # the comparison is not between near-zeros
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)


def test_explicit_positions_change_logits_only_through_rope():
  """Shifting every position by the same offset leaves relative RoPE, hence logits, unchanged."""
  cfg = load_config("tiny")
  model = state.build_model(cfg)
  randomize_params(model, seed=2)
  tokens = tokens_for(cfg)
  base = jnp.broadcast_to(jnp.arange(SEQ), tokens.shape)
  shuffled = jnp.broadcast_to(jnp.arange(SEQ)[::-1], tokens.shape)
  np.testing.assert_allclose(model(tokens, base + 100), model(tokens), atol=1e-4, rtol=1e-4)
  assert not np.allclose(model(tokens, shuffled), model(tokens), atol=1e-3)


# ---------------------------------------------------------------------------
# 2. Causality: the loss at position t depends on no later input.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layers_mode", LAYERS_MODES)
def test_loss_at_t_has_zero_gradient_wrt_later_inputs(layers_mode):
  cfg = stepped_config()
  cfg.model.layers_mode = layers_mode
  model = state.build_model(cfg)
  randomize_params(model, seed=3)
  tokens = tokens_for(cfg)
  targets = tokens_for(cfg, seed=9)
  x_BTD = model.embed_tokens(tokens)

  @jax.jit
  def grad_of_loss_at(x_BTD, t):
    def loss(x):
      logits_BV = model.unembed(model.trunk(x))[:, t]
      logp_BV = jax.nn.log_softmax(logits_BV)
      return -jnp.take_along_axis(logp_BV, targets[:, t, None], axis=-1).sum()

    return jax.grad(loss)(x_BTD)

  for t in (0, 4, SEQ - 1):
    g_BTD = grad_of_loss_at(x_BTD, t)
    assert np.all(np.asarray(g_BTD[:, t + 1 :]) == 0.0), f"future leaks into position {t}"
    assert np.all(np.abs(np.asarray(g_BTD[:, : t + 1])).sum(-1) > 0), f"past unused at {t}"


# ---------------------------------------------------------------------------
# 3. Unrolled and grouped modes compute the same function.
# ---------------------------------------------------------------------------


def cross_entropy(logits_BTV, targets_BT):
  logp = jax.nn.log_softmax(logits_BTV)
  return -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1).mean()


def jitted_logits_and_grads(model, tokens, targets):
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  @jax.jit
  def run(params):
    def loss(params):
      return cross_entropy(nnx.merge(graphdef, params, rest)(tokens), targets)

    logits = nnx.merge(graphdef, params, rest)(tokens)
    return logits, jax.grad(loss)(params)

  return run(params)


def count_scans(model, tokens) -> int:
  """Top-level `scan`s in the forward pass (a fresh lambda: jax caches traces per callable)."""
  jaxpr = jax.make_jaxpr(lambda t: model(t))(tokens)
  return sum(eqn.primitive.name == "scan" for eqn in jaxpr.jaxpr.eqns)


MODE_CASES = {
  # config, groups expected in grouped mode
  "stepped2": (lambda: stepped_config(2), ((0, 1), (2, 3))),
  "uniform": (lambda: load_config("tiny,uniform"), ((0, 1, 2, 3),)),
}


@pytest.mark.parametrize("case", MODE_CASES)
def test_unrolled_and_grouped_agree_in_logits_and_grads(case):
  make_config, grouped_groups = MODE_CASES[case]
  cfg = make_config()
  model = state.build_model(cfg)
  randomize_params(model, seed=4)
  tokens, targets = tokens_for(cfg), tokens_for(cfg, seed=8)
  assert model.groups == tuple((l,) for l in range(cfg.model.num_layers))

  eager_unrolled = model(tokens)
  jit_unrolled, grads_unrolled = jitted_logits_and_grads(model, tokens, targets)
  unrolled_scans = count_scans(model, tokens)

  lm.set_layers_mode(model, "grouped")
  assert model.groups == grouped_groups
  assert any(len(g) > 1 for g in model.groups)
  eager_grouped = model(tokens)
  jit_grouped, grads_grouped = jitted_logits_and_grads(model, tokens, targets)
  grouped_scans = count_scans(model, tokens)

  # Grouped mode really runs scans (one per group), unrolled mode none.
  assert unrolled_scans == 0
  assert grouped_scans == len(grouped_groups)

  np.testing.assert_allclose(eager_grouped, eager_unrolled, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(jit_unrolled, eager_unrolled, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(jit_grouped, jit_unrolled, atol=1e-5, rtol=1e-5)
  per_layer = lm.unstack_layers(grads_grouped, model.groups)  # gradients of stacked params
  flat_u = dict(jax.tree_util.tree_flatten_with_path(grads_unrolled)[0])
  flat_g = dict(jax.tree_util.tree_flatten_with_path(per_layer)[0])
  assert flat_u.keys() == flat_g.keys()
  assert len(flat_u) == len(jax.tree.leaves(lm.unstack_layers(nnx.state(model), model.groups)))
  for path, g in flat_u.items():
    assert np.any(np.asarray(g) != 0), f"no gradient for {jax.tree_util.keystr(path)}"
    np.testing.assert_allclose(
      flat_g[path], g, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path)
    )


def test_remat_policies_do_not_change_logits_or_grads():
  cfg = stepped_config()
  cfg.model.layers_mode = "grouped"
  tokens, targets = tokens_for(cfg), tokens_for(cfg, seed=8)
  plain = state.build_model(cfg)
  randomize_params(plain, seed=4)
  logits, grads = jitted_logits_and_grads(plain, tokens, targets)

  policies = [r for r in lm.REMAT_POLICIES if r != "none"]
  assert policies
  for remat in policies:
    cfg.model.remat = remat
    rematted = state.build_model(cfg)
    nnx.update(rematted, nnx.state(plain))
    remat_logits, remat_grads = jitted_logits_and_grads(rematted, tokens, targets)
    np.testing.assert_allclose(remat_logits, logits, atol=1e-5, rtol=1e-5, err_msg=remat)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=remat),
      remat_grads,
      grads,
    )


def test_set_layers_mode_rejects_unknown_mode():
  model = state.build_model(load_config("tiny"))
  with pytest.raises(ConfigError, match="layers_mode"):
    lm.set_layers_mode(model, "scanned")


# ---------------------------------------------------------------------------
# 4. The two modes' layouts: per-layer `blocks`, stacked `stacks`; one converts to the other.
# ---------------------------------------------------------------------------


def unrolled_and_grouped_models(seed_b: int = 0):
  cfg_a = stepped_config()
  cfg_b = stepped_config()
  cfg_b.model.layers_mode = "grouped"
  a, b = state.build_model(cfg_a, seed=0), state.build_model(cfg_b, seed=seed_b)
  assert b.groups == ((0, 1), (2, 3))
  return cfg_a, a, b


def test_grouped_model_holds_each_group_stacked_with_the_unrolled_initial_values():
  _, a, b = unrolled_and_grouped_models()
  assert set(nnx.to_pure_dict(nnx.state(a))) == {"embed", "blocks", "final_norm", "head"}
  assert set(nnx.to_pure_dict(nnx.state(b))) == {"embed", "stacks", "final_norm", "head"}
  w_gate = b.stacks[1].mlp.w_gate
  assert w_gate.shape == (2, *a.blocks[2].mlp.w_gate.shape)
  assert w_gate.get_metadata()["logical_axes"] == ("layers", "embed", "mlp")
  stacked = lm.stack_layers(nnx.state(a), b.groups)
  assert jax.tree.structure(stacked) == jax.tree.structure(nnx.state(b))
  jax.tree.map(np.testing.assert_array_equal, stacked, nnx.state(b))
  with pytest.raises(ConfigError, match="set_layers_mode"):
    b.blocks  # noqa: B018 (tools that read per-layer blocks get the fix)


def test_layouts_convert_both_ways_with_equal_outputs():
  cfg, a, b = unrolled_and_grouped_models(seed_b=1)
  tokens = tokens_for(cfg)
  assert not np.allclose(b(tokens), a(tokens), atol=1e-3)  # different seeds differ

  nnx.update(b, lm.stack_layers(nnx.state(a), b.groups))
  np.testing.assert_allclose(b(tokens), a(tokens), atol=1e-5, rtol=1e-5)
  back = lm.unstack_layers(nnx.state(b), b.groups)
  assert jax.tree.structure(back) == jax.tree.structure(nnx.state(a))
  jax.tree.map(np.testing.assert_array_equal, back, nnx.state(a))

  lm.set_layers_mode(b, "unrolled")  # in place, both ways
  assert len(b.blocks) == 4 and "stacks" not in vars(b)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(b), nnx.state(a))
  lm.set_layers_mode(a, "grouped")
  assert a.stacks[0].mlp.w_up.shape[0] == 2 and "blocks" not in vars(a)
  np.testing.assert_allclose(a(tokens), b(tokens), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------
# 5. Parameter parity with the uniform twin and with costs.py.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("preset", TAPERS)
def test_tiny_param_count_matches_uniform_twin_and_costs(preset, tie_embeddings):
  cfg = load_config(f"tiny,{preset}")
  cfg.model.tie_embeddings = tie_embeddings
  widths = taper.widths_from_config(cfg)
  model = state.build_model(cfg)
  twin = state.build_model(taper.uniform_twin(cfg))

  assert list(model.widths) == widths
  assert lm.param_count(model) == lm.param_count(twin)
  uniform_stream = [cfg.model.d_model] * len(widths)
  assert lm.param_count(model) == budget.total_params(model_spec(cfg), widths, uniform_stream)
  assert lm.param_count(model) == num_params(nnx.state(model))  # nothing hides outside Params
  for l, width in enumerate(widths):
    block = model.blocks[l]
    assert block.mlp.w_gate.shape == block.mlp.w_up.shape == (cfg.model.d_model, width)
    assert block.mlp.w_down.shape == (width, cfg.model.d_model)
    assert num_params(nnx.state(block, nnx.Param)) == budget.layer_params(model_spec(cfg), width)
  non_layer = (
    num_params(nnx.state(model.final_norm))
    + model.embed.size
    + (0 if model.head is None else model.head.size)
  )
  assert non_layer == budget.embedding_params(model_spec(cfg), uniform_stream)


@pytest.mark.parametrize("scale", LARGE_SCALES)
def test_large_scale_param_counts_match_uniform_twin_and_costs(scale):
  twin_count = None
  for preset in TAPERS:
    cfg = load_config(f"{scale},{preset}")
    widths = taper.widths_from_config(cfg)
    abstract = nnx.eval_shape(lambda cfg=cfg: state.build_model(cfg))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract)))
    count = lm.param_count(abstract)
    if twin_count is None:
      twin_count = lm.param_count(
        nnx.eval_shape(lambda cfg=cfg: state.build_model(taper.uniform_twin(cfg)))
      )
    assert count == twin_count, preset
    assert count == budget.total_params(model_spec(cfg), widths, [cfg.model.d_model] * len(widths))


# ---------------------------------------------------------------------------
# 6. Bad configs fail early, naming the field.
# ---------------------------------------------------------------------------


def _set(**fields):
  def apply(cfg):
    for dotted, value in fields.items():
      *parents, leaf = dotted.split("__")
      node = cfg
      for name in parents:
        node = node[name]
      node[leaf] = value

  return apply


BAD_CONFIGS = {
  "heads_do_not_divide_d_model": (
    _set(model__num_heads=3, model__num_kv_heads=3),
    "model.num_heads=3",
  ),
  "kv_heads_do_not_divide_heads": (_set(model__num_kv_heads=3), "model.num_kv_heads=3"),
  "odd_head_dim": (_set(model__head_dim=15), "model.head_dim"),
  # Library bug: a negative head_dim skips every check and dies inside XLA
  # ("invalid tensor dimension size") instead of raising ConfigError.
  "negative_head_dim": (_set(model__head_dim=-4), "model.head_dim"),
  "mlp_width_not_tile_multiple": (_set(model__mlp_width=250), "model.mlp_width=250"),
  "unknown_schedule": (_set(model__taper__schedule="exponential"), "model.taper.schedule"),
  "unknown_layers_mode": (_set(model__layers_mode="scanned"), "model.layers_mode"),
  "unknown_backbone": (_set(model__backbone="mamba"), "model.backbone"),
  "unknown_dtype": (_set(model__dtype="float8"), "model.dtype"),
  "unknown_remat": (_set(model__remat="sometimes"), "model.remat"),
  "cudnn_with_float32": (_set(model__attention_impl="cudnn"), "model.attention_impl"),
  "negative_start_ratio": (_set(model__taper__start=-1.0), "model.taper.start"),
  "shift_cannot_meet_budget": (
    _set(model__taper__start=5.0, model__taper__end=0.1, model__taper__renormalize="shift"),
    "model.taper.renormalize",
  ),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_raises_config_error_naming_the_field(case):
  mutate, field = BAD_CONFIGS[case]
  cfg = load_config("tiny")
  assert cfg.model.dtype == "float32"
  mutate(cfg)
  with pytest.raises(ConfigError, match=re.escape(field)):
    state.build_model(cfg)


def test_good_tiny_config_builds():
  """The bad-config cases each change one thing in a config that does build."""
  assert isinstance(state.build_model(load_config("tiny")), lm.Decoder)


# ---------------------------------------------------------------------------
# 7. bf16 compute.
# ---------------------------------------------------------------------------


def test_bf16_compute_gives_finite_fp32_logits_close_to_fp32():
  cfg32 = load_config("tiny")
  cfg16 = load_config("tiny")
  cfg16.model.dtype = "bfloat16"
  model32, model16 = state.build_model(cfg32), state.build_model(cfg16, seed=7)
  randomize_params(model32, seed=6, std=0.05)
  nnx.update(model16, nnx.state(model32))
  tokens = tokens_for(cfg32)

  assert model16.embed_tokens(tokens).dtype == jnp.bfloat16  # really computing in bf16
  assert model16.embed[...].dtype == jnp.float32  # params stay fp32
  logits16, logits32 = model16(tokens), model32(tokens)

  assert logits16.dtype == jnp.float32
  assert np.all(np.isfinite(logits16))
  assert float(jnp.std(logits32)) > 0.1
  np.testing.assert_allclose(logits16, logits32, atol=5e-2, rtol=0)
  assert not np.allclose(logits16, logits32, atol=1e-5)  # bf16 rounding is visible


# ---------------------------------------------------------------------------
# 8. Init: width-independent by default, width-scaled MLP outputs as an ablation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["standard", "width_scaled"])
def test_width_scaled_init_evens_out_the_mlp_output_variance_across_widths(init):
  cfg = load_config("tiny,cosine")
  cfg.model.init = init
  model = state.build_model(cfg)
  widths = list(model.widths)
  assert widths[0] >= 2 * widths[-1]
  x = jax.random.normal(jax.random.key(0), (8, 64, cfg.model.d_model))
  variances = [float(jnp.var(model.blocks[l].mlp(x))) for l in range(len(widths))]
  stds = [float(jnp.std(model.blocks[l].mlp.w_down[...])) for l in range(len(widths))]
  spread = variances[0] / variances[-1]
  if init == "standard":  # std independent of width: output variance grows with it
    np.testing.assert_allclose(stds, stds[0], rtol=0.1)
    assert spread > 0.6 * widths[0] / widths[-1]
  else:
    scale = [math.sqrt(cfg.model.mlp_width / w) for w in widths]
    np.testing.assert_allclose(np.array(stds) / scale, stds[0] / scale[0], rtol=0.1)
    assert 0.6 < spread < 1.6


# ---------------------------------------------------------------------------
# 9. Any sequence length, every backbone.
# ---------------------------------------------------------------------------

BACKBONE_CONFIGS = {
  "transformer": ("tlm_transformer", {}),
  "gated_attention": ("tlm_gated_attention", {}),
  "hope_attention": ("tlm_hope_attention", {}),  # level chunks of 8 and 16
  "titans_mag": ("tlm_titans", dict(variant="mag")),  # memory chunks of 16
  "titans_mal": ("tlm_titans", dict(variant="mal")),
  "titans_mac": ("tlm_titans", dict(variant="mac")),  # segments of 16
}


@pytest.mark.parametrize("case", BACKBONE_CONFIGS)
def test_every_backbone_takes_any_length_and_its_padding_changes_no_output(case):
  """21 tokens (no multiple of a chunk or segment) give the first 21 outputs of 32 tokens:
  a memory pads its last chunk internally, and the padding comes after every real token."""
  name, titans = BACKBONE_CONFIGS[case]
  cfg = helpers.load_config(name, "tiny")
  cfg.model.num_layers = 1
  cfg.model.titans.update(titans)
  forward = jax.jit(state.build_model(cfg))
  tokens_BT = tokens_for(cfg, batch=1, seq=32)
  short, long = forward(tokens_BT[:, :21]), forward(tokens_BT)
  assert short.shape == (1, 21, cfg.model.vocab_size)
  np.testing.assert_allclose(short, long[:, :21], atol=1e-5, rtol=1e-5)


def test_model_summary_runs_hope_at_124m_whose_sample_is_no_multiple_of_its_chunks():
  """`python -m tlm_jax.model` stopped at 124m-1.3b: its 141-byte sample is not a multiple of
  the level chunk (16). The 124m shape (bf16, 128-wide levels) on two layers: seconds."""
  cfg = helpers.load_config("tlm_hope_attention", "124m")
  cfg.model.num_layers = 2
  cfg.train.update(seq_len=200, batch_size=2)  # the counted train step pads too (200 = 12.5 x 16)
  out = model_cli.summarize(cfg)
  assert out["logits_shape"] == [1, 141, cfg.model.vocab_size]
  assert out["params"] == out["uniform_twin_params"] == out["params_from_costs"]
  assert out["flops_per_token"] < out["xla_flops_per_token"] < 1.25 * out["flops_per_token"]
  assert abs(out["untrained_loss"] - out["log_vocab"]) < 1.0
