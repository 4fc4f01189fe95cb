"""Tests for the TLM taper: per-layer MLP widths under the uniform model's budget."""

import dataclasses
import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import helpers
from helpers import REPO
from tlm_jax import config as config_lib
from tlm_jax import presets, taper
from tlm_jax.errors import ConfigError
from tlm_jax.model import registry
from tlm_jax.spec import TaperSpec

SMOOTH = ("cosine", "linear", "sigmoid")


def load_experiment_config(arg):
  return helpers.load_config("tlm_transformer", arg)


def is_non_increasing(xs):
  return all(b <= a for a, b in zip(xs, xs[1:]))


def is_non_decreasing(xs):
  return all(b >= a for a, b in zip(xs, xs[1:]))


def runs(xs):
  """Number of maximal blocks of equal adjacent values."""
  return 1 + sum(a != b for a, b in zip(xs, xs[1:]))


def cosine_formula(l, num_layers, start, end):
  return end + (start - end) * (1 + math.cos(math.pi * l / (num_layers - 1))) / 2


def linear_formula(l, num_layers, start, end):
  return start + (end - start) * l / (num_layers - 1)


# --- 1. budget, tiling and monotonicity for every schedule -------------------

ratios = st.floats(min_value=0.1, max_value=4.0, allow_nan=False)


@st.composite
def taper_cases(draw):
  schedule = draw(st.sampled_from(("uniform", "cosine", "linear", "sigmoid", "thirds", "stepped")))
  tile = draw(st.sampled_from((64, 128, 256)))
  tiles_per_layer = draw(st.one_of(st.integers(1, 4), st.integers(1, 40)))
  spec = TaperSpec(
    schedule=schedule,
    start=draw(ratios),
    end=draw(ratios),
    steepness=draw(st.floats(min_value=0.5, max_value=50.0)),
    thirds=tuple(draw(ratios) for _ in range(3)),
    steps=draw(st.integers(1, 8)),
    step_schedule=draw(st.sampled_from(SMOOTH)),
    renormalize=draw(st.sampled_from(("scale", "shift"))),
    tile=tile,
  )
  return spec, draw(st.integers(2, 48)), tile * tiles_per_layer


def expected_direction(spec):
  """-1 / +1 when the widths must be non-increasing / non-decreasing, 0 when free."""
  if spec.schedule in SMOOTH + ("stepped",):
    return (spec.start < spec.end) - (spec.start > spec.end)
  if spec.schedule == "thirds":
    if is_non_increasing(spec.thirds) and spec.thirds[0] > spec.thirds[2]:
      return -1
    if is_non_decreasing(spec.thirds) and spec.thirds[0] < spec.thirds[2]:
      return 1
  return 0


@settings(deadline=None, max_examples=400)
@given(taper_cases())
def test_widths_are_tile_multiples_that_sum_exactly_to_the_budget(case):
  spec, num_layers, base_width = case
  spec.validate()
  try:
    widths = taper.layer_widths(spec, num_layers, base_width)
  except ConfigError:
    return
  assert len(widths) == num_layers
  assert all(isinstance(w, int) and w > 0 and w % spec.tile == 0 for w in widths)
  assert sum(widths) == num_layers * base_width

  direction = expected_direction(spec)
  if direction < 0:
    assert is_non_increasing(widths)
  if direction > 0:
    assert is_non_decreasing(widths)
  if spec.schedule == "uniform" or (spec.schedule in SMOOTH and spec.start == spec.end):
    assert widths == [base_width] * num_layers
  if spec.schedule == "stepped":
    assert len(set(widths)) <= spec.steps
    assert runs(widths) == len(set(widths)), "layers of equal width must be contiguous"


@settings(deadline=None, max_examples=150)
@given(taper_cases())
def test_repair_keeps_every_width_within_its_search_window_of_the_schedule(case):
  spec, num_layers, base_width = case
  try:
    widths = taper.layer_widths(spec, num_layers, base_width)
  except ConfigError:
    return
  ideal, sizes = taper.ideal_widths(spec, num_layers, base_width)
  per_layer_ideal = [w for w, n in zip(ideal, sizes) for _ in range(n)]
  # Two tiles for single layers; stepped groups may move by up to their size more,
  # so that groups of unequal size can still add up to the budget exactly.
  window = (max(sizes) + 1) * spec.tile
  assert all(abs(w - i) < window for w, i in zip(widths, per_layer_ideal))


def largest_remainder_units(ideal_units, target):
  floors = [math.floor(u) for u in ideal_units]
  extra = target - sum(floors)
  by_remainder = sorted(range(len(floors)), key=lambda i: floors[i] - ideal_units[i])
  for i in by_remainder[:extra]:
    floors[i] += 1
  return floors


@settings(deadline=None, max_examples=150)
@given(taper_cases())
def test_repair_is_at_least_as_close_as_largest_remainder_rounding(case):
  spec, num_layers, base_width = case
  if spec.schedule not in SMOOTH + ("thirds",):
    return
  try:
    widths = taper.layer_widths(spec, num_layers, base_width)
  except ConfigError:
    return
  ideal, _ = taper.ideal_widths(spec, num_layers, base_width)
  units = [w / spec.tile for w in ideal]
  if min(units) < 1:
    return
  rounded = largest_remainder_units(units, num_layers * base_width // spec.tile)
  error = sum((w / spec.tile - u) ** 2 for w, u in zip(widths, units))
  assert error <= sum((r - u) ** 2 for r, u in zip(rounded, units)) + 1e-9


@st.composite
def mirrored_cases(draw):
  """A smooth schedule and its mirror image; ratios in eighths, so that exact ties in the
  repair are common (1.5 x 21 tiles = 31.5: round up or down?)."""
  start, end = draw(st.integers(1, 24)) / 8, draw(st.integers(1, 24)) / 8
  spec = TaperSpec(
    schedule=draw(st.sampled_from(SMOOTH)),
    start=start,
    end=end,
    steepness=draw(st.floats(min_value=0.5, max_value=50.0)),
    renormalize=draw(st.sampled_from(("scale", "shift"))),
    tile=128,
  )
  mirror = dataclasses.replace(spec, start=end, end=start)
  return spec, mirror, draw(st.integers(2, 48)), 128 * draw(st.integers(1, 40))


@settings(deadline=None, max_examples=200)
@given(mirrored_cases())
def test_a_mirrored_schedule_gets_the_mirrored_widths(case):
  spec, mirror, num_layers, base_width = case
  try:
    widths = taper.layer_widths(spec, num_layers, base_width)
  except ConfigError:
    with pytest.raises(ConfigError):
      taper.layer_widths(mirror, num_layers, base_width)
    return
  assert taper.layer_widths(mirror, num_layers, base_width) == widths[::-1]


def test_a_tie_rounds_the_wide_end_down_and_the_narrow_end_up_despite_float_noise():
  # 4.5, 3, 1.5 tiles for 9: (4, 3, 2) and (5, 3, 1) are equally close; the noise (as a
  # profile and its mirror carry, computed in floating point) must not decide.
  assert taper.repair_to_budget([4.5 + 1e-12, 3.0, 1.5 - 1e-12], [1, 1, 1], 9, 1) == [4, 3, 2]
  assert taper.repair_to_budget([1.5 + 1e-12, 3.0, 4.5 - 1e-12], [1, 1, 1], 9, 1) == [2, 3, 4]


@pytest.mark.parametrize("tile", [64, 128, 256])
def test_paper_cosine_taper_never_fails_at_reasonable_widths(tile):
  spec = TaperSpec(schedule="cosine", start=1.5, end=0.5, tile=tile)
  for tiles_per_layer in (4, 5, 16, 21, 40):
    for num_layers in range(2, 49):
      widths = taper.layer_widths(spec, num_layers, tile * tiles_per_layer)
      assert sum(widths) == num_layers * tile * tiles_per_layer


@pytest.mark.parametrize("preset", [p for p in presets.TAPERS if p != "stepped"])
def test_presets_never_fail_at_reasonable_widths(preset):
  spec = TaperSpec(**presets.TAPERS[preset])
  for base_width in (4 * 128, 21 * 128):
    for num_layers in range(2, 49):
      taper.layer_widths(spec, num_layers, base_width)


def test_tiny_base_width_falls_back_to_uniform_rather_than_failing():
  spec = TaperSpec(schedule="cosine", start=1.5, end=0.5, tile=128)
  assert taper.layer_widths(spec, 24, 128) == [128] * 24


# --- 2. the published formulas ------------------------------------------------


@pytest.mark.parametrize("start,end", [(1.5, 0.5), (0.5, 1.5), (1.2, 0.8)])
@pytest.mark.parametrize(
  "schedule,formula", [("cosine", cosine_formula), ("linear", linear_formula)]
)
def test_smooth_schedules_follow_the_published_formula(schedule, formula, start, end):
  num_layers, base_width = 12, 3000
  spec = TaperSpec(schedule=schedule, start=start, end=end, tile=1)
  widths = taper.layer_widths(spec, num_layers, base_width)
  for l, w in enumerate(widths):
    assert abs(w - base_width * formula(l, num_layers, start, end)) <= 1
  wide, narrow = (0, -1) if start > end else (-1, 0)
  assert widths[wide] == max(widths)
  assert widths[narrow] == min(widths)


def test_paper_cosine_first_layer_widest_last_narrowest():
  widths = taper.layer_widths(TaperSpec(tile=1), 12, 3000)
  assert widths[0] == 4500 and widths[-1] == 1500
  assert widths == sorted(widths, reverse=True)


def test_sigmoid_runs_from_start_to_end_with_mean_exactly_base():
  num_layers, base_width = 12, 3000
  spec = TaperSpec(schedule="sigmoid", start=1.5, end=0.5, tile=1)
  widths = taper.layer_widths(spec, num_layers, base_width)
  assert abs(widths[0] - base_width * 1.5) <= 1
  assert abs(widths[-1] - base_width * 0.5) <= 1
  assert sum(widths) == num_layers * base_width
  assert is_non_increasing(widths)
  middle = widths[num_layers // 2 - 1] - widths[num_layers // 2]
  edge = widths[0] - widths[1]
  assert middle > edge, "a logistic curve changes fastest in the middle"


def test_thirds_give_each_third_its_multiplier():
  spec = TaperSpec(schedule="thirds", thirds=(1.5, 0.75, 0.75), tile=1)
  assert taper.layer_widths(spec, 12, 3000) == [4500] * 4 + [2250] * 8


def test_thirds_with_uneven_layer_count_put_the_extra_layers_first():
  spec = TaperSpec(schedule="thirds", thirds=(2.0, 1.0, 0.5), tile=1)
  widths = taper.layer_widths(spec, 10, 1000)
  assert runs(widths) == 3
  assert widths.count(widths[0]) == 4
  assert widths.count(widths[-1]) == 3


def test_stepped_approximates_the_cosine_with_group_means():
  num_layers, base_width = 12, 3000
  spec = TaperSpec(schedule="stepped", start=1.5, end=0.5, steps=4, tile=1)
  widths = taper.layer_widths(spec, num_layers, base_width)
  fine = [base_width * cosine_formula(l, num_layers, 1.5, 0.5) for l in range(num_layers)]
  for group in range(4):
    layers = range(3 * group, 3 * group + 3)
    assert len({widths[l] for l in layers}) == 1
    assert abs(widths[layers[0]] - sum(fine[l] for l in layers) / 3) <= 1
  assert sum(widths) == num_layers * base_width


def test_scale_renormalization_only_depends_on_the_ratio_of_start_to_end():
  paper = taper.layer_widths(TaperSpec(start=1.5, end=0.5, tile=1), 12, 3000)
  doubled = taper.layer_widths(TaperSpec(start=3.0, end=1.0, tile=1), 12, 3000)
  assert doubled == paper


def test_shift_renormalization_moves_every_layer_by_the_same_amount():
  paper = taper.layer_widths(TaperSpec(start=1.5, end=0.5, tile=1), 12, 3000)
  shifted = taper.layer_widths(TaperSpec(start=2.0, end=1.0, renormalize="shift", tile=1), 12, 3000)
  assert all(abs(a - b) <= 1 for a, b in zip(shifted, paper))
  assert sum(shifted) == 12 * 3000


# --- 3. tensor parallelism ----------------------------------------------------


@pytest.mark.parametrize("tensor_parallel", [2, 3, 5, 6])
def test_tensor_parallel_widths_split_evenly_across_devices(tensor_parallel):
  multiple = math.lcm(128, tensor_parallel)
  assert taper.rounding_multiple(128, tensor_parallel) == multiple
  base_width = 6 * multiple
  widths = taper.layer_widths(TaperSpec(tile=128), 12, base_width, tensor_parallel=tensor_parallel)
  assert all(w % multiple == 0 for w in widths)
  assert sum(widths) == 12 * base_width
  assert is_non_increasing(widths) and widths[0] > widths[-1]


def test_tensor_parallel_three_rejects_a_width_that_is_only_a_tile_multiple():
  with pytest.raises(ConfigError, match=r"model\.mlp_width=2048 is not a multiple of 384"):
    taper.layer_widths(TaperSpec(tile=128), 12, 2048, tensor_parallel=3)


def test_widths_from_config_honour_mesh_tensor():
  cfg = load_experiment_config("124m")
  cfg.mesh.tensor = 3
  with pytest.raises(ConfigError, match=r"model\.mlp_width"):
    taper.widths_from_config(cfg)
  cfg.model.mlp_width = 2304
  widths = taper.widths_from_config(cfg)
  assert all(w % 384 == 0 for w in widths)
  assert sum(widths) == 12 * 2304


def test_fill_tensor_axis_is_treated_as_one():
  cfg = load_experiment_config("124m")
  cfg.mesh.tensor = -1
  assert sum(taper.widths_from_config(cfg)) == 12 * 2048


# --- 4. custom widths -----------------------------------------------------------


def test_custom_widths_are_returned_unchanged():
  widths = [384, 256, 128, 256]
  spec = TaperSpec.from_config(dict(schedule="custom", widths=widths))
  assert taper.layer_widths(spec, 4, 256) == widths


@pytest.mark.parametrize(
  "widths,num_layers",
  [
    ([384, 256, 128], 4),  # too few entries
    ([384, 256, 128, 256, 0], 4),  # too many entries
    ([400, 240, 128, 256], 4),  # not multiples of the tile
    ([384, 256, 0, 384], 4),  # a zero-width layer
    ([384, 256, 256, 256], 4),  # over budget
    ([256, 256, 128, 256], 4),  # under budget
  ],
)
def test_bad_custom_widths_name_the_field(widths, num_layers):
  spec = TaperSpec(schedule="custom", widths=tuple(widths))
  with pytest.raises(ConfigError, match=r"model\.taper\.widths"):
    taper.layer_widths(spec, num_layers, 256)


def test_custom_widths_must_respect_the_tensor_axis():
  spec = TaperSpec(schedule="custom", widths=(768, 512, 128, 128))
  with pytest.raises(ConfigError, match=r"model\.taper\.widths"):
    taper.layer_widths(spec, 4, 384, tensor_parallel=3)


# --- 5. clear errors --------------------------------------------------------------


@pytest.mark.parametrize(
  "fields,field_name",
  [
    (dict(schedule="triangle"), r"model\.taper\.schedule"),
    (dict(schedule="cosine", start=0.0), r"model\.taper\.start"),
    (dict(schedule="linear", start=-1.0), r"model\.taper\.start"),
    (dict(schedule="sigmoid", end=0.0), r"model\.taper\.end"),
    (dict(schedule="stepped", end=-0.5), r"model\.taper\.end"),
    (dict(schedule="stepped", step_schedule="thirds"), r"model\.taper\.step_schedule"),
    (dict(schedule="stepped", steps=0), r"model\.taper\.steps"),
    (dict(schedule="thirds", thirds=(1.5, 0.0, 1.5)), r"model\.taper\.thirds"),
    (dict(schedule="thirds", thirds=(1.5, 0.75)), r"model\.taper\.thirds"),
    (dict(schedule="sigmoid", steepness=0.0), r"model\.taper\.steepness"),
    (dict(renormalize="stretch"), r"model\.taper\.renormalize"),
    (dict(tile=0), r"model\.taper\.tile"),
    (dict(widht=3), r"model\.taper has unknown field"),
  ],
)
def test_invalid_taper_config_names_the_field(fields, field_name):
  with pytest.raises(ConfigError, match=field_name):
    TaperSpec.from_config(fields)


def test_unknown_field_in_a_config_dict_is_rejected():
  cfg = load_experiment_config("tiny")
  cfg.model.taper.strat = 1.5
  with pytest.raises(ConfigError, match=r"unknown field.*strat"):
    TaperSpec.from_config(cfg.model.taper)


@pytest.mark.parametrize("base_width", [2000, 100, 2048 + 64])
def test_base_width_not_a_tile_multiple_names_mlp_width(base_width):
  with pytest.raises(ConfigError, match=r"model\.mlp_width"):
    taper.layer_widths(TaperSpec(tile=128), 12, base_width)


def test_layers_that_need_less_than_a_tile_point_at_the_tile():
  spec = TaperSpec(schedule="thirds", thirds=(2.0, 0.01, 0.01), tile=128)
  with pytest.raises(ConfigError, match=r"model\.taper\.tile"):
    taper.layer_widths(spec, 8, 256)


def test_shift_renormalization_that_goes_negative_is_rejected():
  spec = TaperSpec(schedule="cosine", start=3.0, end=0.2, renormalize="shift")
  with pytest.raises(ConfigError, match=r"model\.taper\.renormalize='shift'"):
    taper.layer_widths(spec, 12, 2048)


def test_stepped_sigmoid_with_zero_steepness_is_a_config_error():
  with pytest.raises(ConfigError, match=r"model\.taper\.steepness"):
    spec = TaperSpec.from_config(dict(schedule="stepped", step_schedule="sigmoid", steepness=0.0))
    taper.layer_widths(spec, 12, 2048)


@pytest.mark.parametrize("steepness", [1000.0, 2000.0, 1e4])
def test_very_steep_sigmoid_gives_a_step_or_a_config_error(steepness):
  spec = TaperSpec.from_config(dict(schedule="sigmoid", steepness=steepness))
  try:
    widths = taper.layer_widths(spec, 12, 2048)
  except ConfigError:
    return
  assert widths == [3072] * 6 + [1024] * 6


# --- 6. configs and the CLI ---------------------------------------------------------


@pytest.mark.parametrize("preset", list(presets.TAPERS))
@pytest.mark.parametrize("scale", list(presets.SCALES))
def test_every_experiment_config_matches_its_uniform_twin(scale, preset):
  cfg = load_experiment_config(f"{scale},{preset}")
  report = taper.parity_report(cfg)
  assert report["param_difference"] == 0
  assert report["total_params"] == report["uniform_total_params"]
  assert report["flops_per_token"] == report["uniform_flops_per_token"]
  assert sum(report["widths"]) == cfg.model.num_layers * cfg.model.mlp_width
  assert len(report["layers"]) == cfg.model.num_layers


def test_uniform_twin_is_uniform_and_leaves_the_config_alone():
  cfg = load_experiment_config("124m,stepped")
  twin = taper.uniform_twin(cfg)
  assert taper.widths_from_config(twin) == [2048] * 12
  assert cfg.model.taper.schedule == "stepped"
  assert twin.model.num_layers == cfg.model.num_layers
  assert twin.model.d_model == cfg.model.d_model


def test_tapered_presets_actually_taper():
  widths = {
    p: taper.widths_from_config(load_experiment_config(f"124m,{p}")) for p in presets.TAPERS
  }
  assert len(set(widths["uniform"])) == 1
  assert widths["cosine"][0] > widths["cosine"][-1]
  assert widths["reverse"][0] < widths["reverse"][-1]
  assert widths["reverse"] == widths["cosine"][::-1]
  assert len(set(widths["stepped"])) == 4
  early, middle, late = (
    max(range(12), key=widths[p].__getitem__) for p in ("early", "middle", "late")
  )
  assert early < 4 <= middle < 8 <= late


@pytest.mark.parametrize("backbone", list(registry.BACKBONES))
def test_reverse_is_the_mirror_of_cosine_at_every_scale(backbone):
  for scale in presets.SCALES:
    cosine, reverse = (
      taper.widths_from_config(helpers.load_config(f"tlm_{backbone}", f"{scale},{preset}"))
      for preset in ("cosine", "reverse")
    )
    assert reverse == cosine[::-1], scale
    assert cosine[0] > cosine[-1], scale


def run_cli(*args):
  return subprocess.run(
    [sys.executable, "-m", "tlm_jax.taper", *args],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )


def test_cli_json_report():
  result = run_cli("--config", "configs/tlm_transformer.py:124m", "--json")
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout)
  for key in (
    "schedule",
    "widths",
    "total_params",
    "uniform_total_params",
    "param_difference",
    "flops_per_token",
    "uniform_flops_per_token",
  ):
    assert key in report
  assert report["schedule"] == "cosine"
  assert len(report["widths"]) == 12
  assert all(isinstance(w, int) for w in report["widths"])
  assert sum(report["widths"]) == 12 * 2048
  assert report["param_difference"] == 0
  assert report["flops_per_token"] == report["uniform_flops_per_token"]


def test_cli_table_report_shows_zero_difference():
  result = run_cli("--config", "configs/tlm_transformer.py:124m")
  assert result.returncode == 0, result.stderr
  assert "difference" in result.stdout
  assert "+0" in result.stdout
  assert len(result.stdout.strip().splitlines()) == 1 + 12 + 4


def test_cli_bad_scale_exits_non_zero_naming_scale():
  result = run_cli("--config", "configs/tlm_transformer.py:999m")
  assert result.returncode != 0
  assert "SCALE" in result.stdout + result.stderr


# --- 7. matched scales across backbones -----------------------------------------------

SCALE_PARAMS = {"440m": 440e6, "760m": 760e6, "1.3b": 1.3e9}


@pytest.mark.parametrize("scale", SCALE_PARAMS)
@pytest.mark.parametrize(
  "backbone,variant",
  [(b, "mag") for b in list(registry.BACKBONES)] + [("titans", "mal"), ("titans", "mac")],
)
def test_every_backbone_lands_within_3_percent_of_each_named_scale(backbone, variant, scale):
  cfg = helpers.load_config(f"tlm_{backbone}", scale)
  cfg.model.titans.variant = variant
  report = taper.parity_report(cfg)
  assert abs(report["uniform_total_params"] / SCALE_PARAMS[scale] - 1) <= 0.03, report[
    "uniform_total_params"
  ]
  assert report["total_params"] == report["uniform_total_params"]


# --- 8. the paper recipe ---------------------------------------------------------------


@pytest.mark.parametrize("backbone", list(registry.BACKBONES))
def test_paper_recipe_is_the_third_part_of_every_backbone_config_arg(backbone):
  cfg = helpers.load_config(f"tlm_{backbone}", "760m,cosine,paper")
  tr = cfg.train
  assert (tr.seq_len, tr.batch_size * tr.seq_len) == (4096, 524288)  # 0.5M-token batches
  assert tr.batch_size % tr.grad_accum == 0 and tr.grad_accum > 1
  assert (tr.learning_rate, tr.lr_schedule, tr.weight_decay) == (4e-4, "cosine", 0.1)
  assert tr.steps * 524288 == pytest.approx(50e9, rel=1e-3)  # 50B tokens at 760m
  assert cfg.data.tokenizer == "sentencepiece" and cfg.model.vocab_size == 32000
  assert cfg.model.taper.schedule == "cosine"
  default = helpers.load_config(f"tlm_{backbone}", "760m,cosine")
  assert default.train.seq_len == 1024 and default.data.tokenizer == "byte"
  with pytest.raises(ConfigError, match="RECIPE"):
    helpers.load_config(f"tlm_{backbone}", "760m,cosine,papr")


def test_train_refuses_a_vocabulary_far_larger_than_the_tokenizers_unless_asked():
  cfg = helpers.load_config("tlm_transformer", "760m")  # 32K model, byte tokenizer
  with pytest.raises(ConfigError, match="31,744 embedding rows.*data.allow_unused_vocab"):
    config_lib.check_vocab(cfg, 256)
  config_lib.check_vocab(cfg, 32000)
  config_lib.check_vocab(cfg, 31900)  # a tokenizer padded to a tile is fine
  with pytest.raises(ConfigError, match="raise model.vocab_size"):
    config_lib.check_vocab(cfg, 32001)
  cfg.data.allow_unused_vocab = True
  config_lib.check_vocab(cfg, 256)


def test_a_workdir_written_before_new_defaults_keeps_what_it_trained(tmp_path):
  cfg = helpers.load_config("tlm_hope_attention", "tiny")
  saved = json.loads(cfg.to_json())
  del saved["model"]["gate_bias"], saved["model"]["hope"]["max_step"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  old = config_lib.from_json(str(tmp_path / "config.json"))
  assert old.model.gate_bias is True  # gated attention had a bias then
  assert old.model.hope.max_step == 0.0  # no trust region, and the mean-loss step
  assert old.model.hope.inner_lrs == (3e-4 / 8, 3e-4 / 16, 0.0)
  (tmp_path / "config.json").write_text(cfg.to_json())
  assert config_lib.from_json(str(tmp_path / "config.json")) == cfg
