"""tlm_jax.analysis: alignment, swap-KL, looping and Late-Stage LoRA on one tiny trained workdir."""

import functools
import json
import math
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from tlm_jax import restore, state
from tlm_jax.analysis import alignment, blocks, hyperfit, load, looping, lora, swap_kl
from tlm_jax.config import model_spec
from tlm_jax.data import tokenizers
from tlm_jax.model import lm

ANALYSES = ("alignment", "swap_kl", "looping", "hyperfit")
BACKBONES = ("transformer", "gated_attention", "titans", "hope_attention")
STEPS = helpers.TINY_WORKDIR_STEPS
SMALL_SET = [f"sample {i}: the quick brown fox jumps" for i in range(8)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, tiny_workdir):
  """The shared tiny workdir (a cosine-tapered Transformer, widths 384, 320, 192, 128),
  copied: the CLIs write their results into it."""
  return shutil.copytree(tiny_workdir, tmp_path_factory.mktemp("analysis") / "run")


@pytest.fixture(scope="module")
def run(workdir):
  """On one device: replicated over 8 simulated ones, every analysis would run 8 times."""
  return restore.latest(str(workdir), jax.devices()[:1])


@pytest.fixture(scope="module")
def batches(run):
  return load.validation_batches(run.config, 1, 4)


def tokens(batch=2, length=16, seed=0):
  return np.asarray(jax.random.randint(jax.random.key(seed), (batch, length), 0, 256))


def logits(model, tokens_BT):
  return np.asarray(blocks.jit_method(model, lm.Decoder.__call__)(tokens_BT))


# ---------------------------------------------------------------------------
# Sublayer instrumentation.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_plans_rerun_the_models_own_forward_and_alignment_runs_on_every_backbone(backbone):
  model = state.build_model(helpers.load_config(f"tlm_{backbone}", "tiny"))
  x, order = tokens(), jnp.arange(len(model.blocks))

  def all_three(m, x):  # one compiled program: compiling is most of the time here
    return m(x), blocks.plan_logits(m, x, order, order), alignment.moments(m, x)

  own, plan, moments = blocks.jit_method(model, all_three)(x)
  np.testing.assert_allclose(plan, own, atol=1e-6)
  mean = np.asarray(moments) / x.size  # (L, mixer|mlp, moments): E cos, E cos^2, E rel, E rel^2
  assert mean.shape == (4, 2, 4) and np.isfinite(mean).all()
  assert np.all(np.abs(mean[..., 0]) <= 1) and np.all(mean[..., 0] ** 2 <= mean[..., 1] + 1e-6)
  assert np.all(mean[..., 2] > 0)


class Constant(nnx.Module):
  """A mixer whose output is one fixed vector."""

  def __init__(self, u):
    self.u = nnx.Param(jnp.asarray(u, jnp.float32))

  def __call__(self, x_BTD, positions_BT):
    return jnp.broadcast_to(self.u[...], x_BTD.shape)


class Rotation(nnx.Module):
  """An MLP that rotates its input by theta in the plane of the first two axes."""

  def __init__(self, theta, d):
    r = np.eye(d, dtype=np.float32)
    r[:2, :2] = [[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]]
    self.r = nnx.Param(jnp.asarray(r))

  def __call__(self, x_BTD):
    return x_BTD @ self.r[...]


class Identity(nnx.Module):
  def __call__(self, x_BTD):
    return x_BTD


def test_alignment_of_a_hand_built_model_gives_the_analytic_cosines():
  model = state.build_model(helpers.load_config("tlm_transformer", "tiny"))
  d = model.embed.shape[1]
  e = np.zeros(d, np.float32)
  e[0] = 2.0
  model.embed[...] = jnp.broadcast_to(e, model.embed.shape)  # every token embeds as e
  thetas = [0.0, math.pi / 6, math.pi / 3, math.pi / 2]
  for l, block in enumerate(model.blocks):
    u = np.zeros(d, np.float32)
    u[1] = l + 1.0
    block.mixer_norm, block.mlp_norm = Identity(), Identity()
    block.mixer, block.mlp = Constant(u), Rotation(thetas[l], d)
  result = alignment.analyze_model(model, [dict(inputs=tokens(2, 8))])

  x = e[:2].astype(np.float64)
  for l, row in enumerate(result["layers"]):
    u = np.array([0.0, l + 1.0])
    mixer_cos = u @ x / np.linalg.norm(u) / np.linalg.norm(x)
    assert row["mixer"]["cosine_mean"] == pytest.approx(mixer_cos, abs=1e-5)
    assert row["mixer"]["relative_norm_mean"] == pytest.approx(
      np.linalg.norm(u) / np.linalg.norm(x), rel=1e-5
    )
    x = x + u
    assert row["mlp"]["cosine_mean"] == pytest.approx(math.cos(thetas[l]), abs=1e-5)
    assert row["mlp"]["relative_norm_mean"] == pytest.approx(1.0, rel=1e-5)  # a rotation
    assert row["mlp"]["cosine_std"] == pytest.approx(0.0, abs=1e-3)  # every token alike
    c, s = math.cos(thetas[l]), math.sin(thetas[l])
    x = x + np.array([c * x[0] - s * x[1], s * x[0] + c * x[1]])


# ---------------------------------------------------------------------------
# Swap-KL.
# ---------------------------------------------------------------------------


def permuted_model(model, spec, perm, mode):
  """A plain Decoder whose slot i holds layer perm[i] (whole, or only its mixer and norm)."""
  widths = [model.widths[p] if mode == "block" else w for p, w in zip(perm, model.widths)]
  graphdef, _ = nnx.split(lm.Decoder(spec, widths, rngs=nnx.Rngs(0)))
  pure = nnx.to_pure_dict(nnx.state(model))
  new_blocks = {}
  for i, p in enumerate(perm):
    source = pure["blocks"][p] if mode == "block" else pure["blocks"][i]
    new_blocks[i] = {**source, "mixer": pure["blocks"][p]["mixer"]}
    new_blocks[i]["mixer_norm"] = pure["blocks"][p]["mixer_norm"]
  return nnx.merge(graphdef, {**pure, "blocks": new_blocks})


def test_swap_kl_properties_on_the_trained_tapered_model(run, batches):
  model, n, x = run.model, 4, batches[0]["inputs"]
  assert model.widths == (384, 320, 192, 128)
  scorer = swap_kl.Scorer(model, batches)
  for mode in swap_kl.MODES:
    for i in range(n):
      assert scorer.kl(swap_kl.replaced(n, i, i, mode)) == 0.0  # a layer with itself
    d_int = scorer.kl(swap_kl.interchanged(n, 1, 3, mode))
    assert d_int > 0 and scorer.kl(swap_kl.interchanged(n, 3, 1, mode)) == d_int
    # The documented treatment of unequal widths: the plan equals a model built that way.
    mixers, mlps = swap_kl.interchanged(n, 0, 2, mode)
    plan = blocks.jit_method(model, blocks.plan_logits)(x, mixers, mlps)
    built = permuted_model(model, model_spec(run.config), [2, 1, 0, 3], mode)
    np.testing.assert_allclose(plan, logits(built, x), atol=2e-5)
  nll = np.asarray(blocks.token_nll(logits(model, x), batches[0]["targets"]), np.float64)
  assert scorer.perplexity(swap_kl.removed(n, [])) == pytest.approx(math.exp(nll.mean()), rel=1e-5)
  assert scorer.perplexity(swap_kl.removed(n, [1])) > 1.001 * math.exp(nll.mean())


def test_pruning_removes_the_later_layer_of_the_closest_pairs_still_whole():
  d = np.array([[0, 0.3, 0.5, 0.9], [0.3, 0, 0.01, 0.8], [0.5, 0.01, 0, 0.7], [0.9, 0.8, 0.7, 0]])
  assert swap_kl.pruning_order(d, 3) == [2, 1, 3]
  assert swap_kl.similar_pairs(d) == [[1, 2, 0.01]]


def test_replacement_by_an_equal_layer_is_zero():
  config = helpers.load_config("tlm_transformer", "tiny,uniform")
  model = state.build_model(config)
  nnx.update(model.blocks[2], nnx.state(model.blocks[1]))
  scorer = swap_kl.Scorer(model, [dict(inputs=tokens(), targets=tokens(seed=1))])
  for mode in swap_kl.MODES:
    d = swap_kl.distances(scorer, mode)["replacement"]
    assert d[1, 2] == d[2, 1] == 0.0
    assert d[0, 1] > 0 and d[2, 3] > 0


# ---------------------------------------------------------------------------
# Looping.
# ---------------------------------------------------------------------------


def test_looping_once_is_the_model_and_damped_identity_is_identity(run, batches):
  model, x = run.model, batches[0]["inputs"]
  plain = logits(model, x)
  fn = blocks.jit_method(model, functools.partial(looping.looped_logits, size=2))
  for variant in looping.VARIANTS:
    loops, step, anchor = looping.variant_args(variant, 1)
    np.testing.assert_array_equal(fn(x, 1, loops, step, anchor), plain)
  naive = fn(x, 1, *looping.variant_args("naive", 3))
  assert not np.allclose(naive, plain, atol=1e-3)
  h = jax.random.normal(jax.random.key(0), (2, 8, 16))
  for anchor in (0.0, 0.5):
    np.testing.assert_array_equal(looping.damped_loop(lambda y: y, h, 5, 0.2, anchor), h)


# ---------------------------------------------------------------------------
# Late-Stage LoRA.
# ---------------------------------------------------------------------------


def test_lora_trains_only_late_adapters_to_a_low_loss_and_merges_exactly(run):
  graphdef, params = nnx.split(run.model)
  model = nnx.merge(graphdef, nnx.to_pure_dict(params))  # new variables: the fixture stays
  # After 12 steps the unembedding is still tiny: through the final RMSNorm no hidden state
  # can make a confident prediction (max logit ~3), whatever the late layers do. A sharper
  # final norm gives the adapted layers the room a trained model has.
  model.final_norm.scale[...] = model.final_norm.scale[...] * 8
  before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model)))
  data = lora.encode(SMALL_SET, tokenizers.ByteTokenizer(), 32)
  settings = lora.Settings(layers=2, rank=8, learning_rate=5e-3, epochs=80, batch_size=8)
  adapters, losses = lora.train(model, data, settings)

  base = nnx.to_pure_dict(nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, base, before)  # the base is bit-identical
  kinds = [f"mixer.w_{n}" for n in "qkvo"] + [f"mlp.w_{n}" for n in ("gate", "up", "down")]
  assert sorted(adapters) == sorted(f"blocks.{l}.{k}" for l in (2, 3) for k in kinds)
  start = lora.init_adapters(base, [2, 3], settings.rank, settings.seed)
  for name, ab in adapters.items():
    assert np.any(ab["b"] != 0), name
    assert np.any(ab["a"] != start[name]["a"]), name

  assert len(losses) == 80 and losses[0] > 2.0 and losses[-1] < 0.5  # each batch: the whole set

  merged = lora.merge_adapters(base, adapters, settings.scale)
  w = base["blocks"][3]["mixer"]["w_o"]  # (N, H, D): fan_in N*H, fan_out D
  ab = adapters["blocks.3.mixer.w_o"]
  delta = settings.scale * np.asarray(ab["a"]) @ np.asarray(ab["b"])
  want = np.asarray(w) + delta.reshape(w.shape)
  np.testing.assert_allclose(merged["blocks"][3]["mixer"]["w_o"], want, atol=1e-6)
  adapted = jax.jit(
    lambda ad, p, x: nnx.merge(graphdef, lora.merge_adapters(p, ad, settings.scale))(x)
  )(adapters, base, data["inputs"])
  plain = nnx.merge(graphdef, merged)
  np.testing.assert_allclose(logits(plain, data["inputs"]), adapted, atol=1e-5)


def test_participation_ratio_counts_dimensions():
  rng = np.random.default_rng(0)
  assert hyperfit.participation_ratio(rng.normal(size=(20000, 32))) == pytest.approx(32, rel=0.05)
  low_rank = rng.normal(size=(5000, 3)) @ rng.normal(size=(3, 32))
  assert hyperfit.participation_ratio(low_rank) <= 3 + 1e-6


def test_diversity_and_entropy_matched_temperature():
  out = hyperfit.diversity(np.array([[1, 2, 1, 2, 1, 2], [1, 2, 3, 4, 5, 6]]))
  assert out["type_token_ratio"] == pytest.approx((2 / 6 + 1) / 2)
  assert out["bigram_repetition"] == pytest.approx((1 - 2 / 5) / 2)
  assert out["trigram_repetition"] == pytest.approx((1 - 2 / 4) / 2)
  z = jax.random.normal(jax.random.key(0), (3, 5, 50)) * 3
  target = float(hyperfit.entropy(z / 2).mean())
  assert hyperfit.match_temperature(z, target, np.ones((3, 5))) == pytest.approx(2.0, rel=1e-4)


# ---------------------------------------------------------------------------
# The CLIs.
# ---------------------------------------------------------------------------


def finish(procs, timeout=600):
  """[(stdout, stderr, returncode)] of started CLIs, in order."""
  results = []
  for proc, out, err in procs:
    proc.wait(timeout=timeout)
    results.append((out.read_text(), err.read_text(), proc.returncode))
  return results


@pytest.fixture(scope="module", autouse=True)
def clis(tmp_path_factory, workdir):
  """Every CLI run (--help; on a workdir without checkpoints; for real), started as soon as
  the workdir exists, on one CPU device as a user would: they mostly compile, and run on the
  second core beside the in-process tests. Tests wait for the ones they read."""
  tmp = tmp_path_factory.mktemp("cli")
  empty, twin, small_set = tmp / "empty", tmp / "twin", tmp / "small.jsonl"
  empty.mkdir()
  shutil.copy(workdir / "config.json", empty / "config.json")
  shutil.copytree(workdir, twin)
  lines = SMALL_SET + [f"held out {i}: a lazy dog sleeps" for i in range(4)]
  small_set.write_text("".join(json.dumps(dict(text=t)) + "\n" for t in lines))
  data, small = ["--data", str(small_set)], ["--batches", "1", "--batch_size", "4"]
  fit = [*data, "--layers", "2", "--epochs", "2", "--heldout", "4"]
  commands = dict(
    help=[(name, ["--help"]) for name in ANALYSES],
    empty=[(name, ["--workdir", str(empty), *data * (name == "hyperfit")]) for name in ANALYSES],
    runs=[
      ("alignment", ["--workdir", f"{workdir},{twin}", *small]),
      ("swap_kl", ["--workdir", str(workdir), *small, "--random_trials", "2"]),
      ("looping", ["--workdir", str(workdir), *small, "--max_loops", "3"]),
      ("hyperfit", ["--workdir", str(workdir), *fit, "--prompt_tokens", "8", "--new_tokens", "8"]),
    ],
  )
  env = helpers.one_device_env()
  procs = {kind: [] for kind in commands}
  for kind, items in commands.items():
    for i, (name, args) in enumerate(items):
      out, err = tmp / f"{kind}{i}.out", tmp / f"{kind}{i}.err"
      with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen(
          [sys.executable, "-m", f"tlm_jax.analysis.{name}", *args],
          cwd=helpers.REPO,
          env=env,
          stdout=stdout,
          stderr=stderr,
        )
      procs[kind].append((proc, out, err))
  yield dict(procs=procs, empty=empty, twin=twin, workdir=workdir)
  for proc, _, _ in sum(procs.values(), []):
    if proc.poll() is None:
      proc.kill()


def test_every_cli_has_help_and_fails_in_one_line_without_a_checkpoint(clis):
  for name, (out, _, _) in zip(ANALYSES, finish(clis["procs"]["help"])):
    assert "--workdir" in out and "Try --helpfull" in out, name
  empty = clis["empty"]
  for name, (_, err, code) in zip(ANALYSES, finish(clis["procs"]["empty"])):
    assert code == 2, (name, err[-2000:])
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: no checkpoint in {empty}/checkpoints: train this workdir first"]
  assert sorted(p.name for p in empty.iterdir()) == ["config.json"]  # nothing created


@pytest.fixture(scope="module")
def outputs(clis):
  for name, (_, err, code) in zip(ANALYSES, finish(clis["procs"]["runs"])):
    assert code == 0, (name, err[-3000:])
  return clis


def read(outputs, name):
  return json.loads((outputs["workdir"] / f"analysis_{name}.json").read_text())


def test_every_cli_writes_its_json_and_png(outputs):
  for name in ANALYSES:
    result = read(outputs, name)
    assert result["step"] == STEPS and result["backbone"] == "transformer", name
    assert (outputs["workdir"] / f"analysis_{name}.png").stat().st_size > 10_000, name
  twin = json.loads((outputs["twin"] / "analysis_alignment.json").read_text())
  assert twin["layers"] == read(outputs, "alignment")["layers"]  # same weights, same numbers
  assert (outputs["twin"] / "analysis_alignment.png").exists()


def test_swap_kl_matrices_and_pruning_curves(outputs):
  result = read(outputs, "swap_kl")
  for mode in swap_kl.MODES:
    for protocol in swap_kl.PROTOCOLS:
      matrix = np.array(result["modes"][mode][protocol])
      assert matrix.shape == (4, 4) and np.all(np.diag(matrix) == 0) and np.all(matrix >= 0)
      np.testing.assert_array_equal(matrix, matrix.T)
      assert matrix[0, 1] > 0
      pairs = result["modes"][mode]["similar_pairs"][protocol]
      assert all(matrix[i, j] == d < swap_kl.SIMILAR for i, j, d in pairs)
      curve = result["pruning"]["kl_guided"][mode][protocol]
      assert len(curve["removed"]) == 2 and curve["perplexity"][0] == result["perplexity"]
  assert result["modes"]["block"]["replacement"] != result["modes"]["mixer"]["replacement"]
  assert result["pruning"]["budgets"] == [0, 1, 2]
  assert result["pruning"]["random"]["perplexity"][0] == result["perplexity"]


def test_looping_sweeps(outputs):
  result = read(outputs, "looping")
  assert result["window"] == dict(start=2, size=1, layers=[2])  # 4 layers: one, at 52.5%
  assert [result["by_loops"][v][0] for v in looping.VARIANTS] == [result["perplexity"]] * 3
  assert result["by_loops"]["loops"] == [1, 2, 3] and result["by_position"]["starts"] == [
    0,
    1,
    2,
    3,
  ]


def test_hyperfit_report_and_checkpoint(outputs):
  result = read(outputs, "hyperfit")
  assert (
    result["layers"] == [2, 3] and result["train_samples"] == 8 and result["heldout_samples"] == 4
  )
  assert (outputs["workdir"] / "hyperfit" / "checkpoints" / "2").is_dir()  # 2 epochs of 1 step
  assert result["train_loss"]["after"] < result["train_loss"]["before"]
  for name in ("base", "hyperfit", "temperature_control"):
    report = result["generation"][name]
    assert 0 < report["type_token_ratio"] <= 1 and 0 <= report["top1_agreement"] <= 1
  assert result["generation"]["base"]["top1_agreement"] == 1.0
  assert result["generation"]["temperature_control"]["top1_agreement"] == 1.0  # T keeps argmax
  assert len(result["participation_ratio"]["base"]) == 4
  # The adapters change nothing before the adapted layers.
  assert result["participation_ratio"]["hyperfit"][:2] == result["participation_ratio"]["base"][:2]
