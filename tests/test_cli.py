"""Bad command lines as one `error:` line naming the flag or key: checked in-process through
the same parsing every CLI uses (tlm_jax/cli.py), plus one real command for the exit status."""

import subprocess
import sys

import pytest
from absl import flags

from helpers import REPO, load_config
from tlm_jax import cli, generate
from tlm_jax.errors import ConfigError

TINY = f"{REPO}/configs/tlm_transformer.py:tiny"


def parse(argv):
  """The config a command line gives, parsed as a CLI parses it (own flags, not the global)."""
  flag_values = flags.FlagValues()
  holder = cli.config_flag(flag_values, argv)
  cli.parse_flags(argv, flag_values)
  return holder.value


@pytest.mark.parametrize(
  "spec", ["configs/nonexistent.py", "configs/nonexistent.py:tiny", "w/config.json"]
)
def test_a_missing_config_file_is_named(spec):
  with pytest.raises(ConfigError, match=f"^--config {spec}: no such file"):
    cli.load_config(spec)


def test_an_unknown_scale_is_named_with_the_nearest():
  with pytest.raises(ConfigError) as error:
    parse(["prog", "--config", f"{REPO}/configs/tlm_transformer.py:124M"])
  message = str(error.value)
  assert message.startswith("--config ") and "'124M'" in message
  assert "did you mean '124m'?" in message


def test_an_unknown_key_is_named_with_the_nearest_keys_of_its_section():
  with pytest.raises(ConfigError) as error:
    parse(["prog", "--config", TINY, "--config.model.taper.strat=1.2"])
  assert str(error.value) == (
    "--config.model.taper.strat: config.model.taper has no field 'strat'; "
    "did you mean 'config.model.taper.start'?"
  )
  with pytest.raises(ConfigError, match="config has no field 'no_such_key'; its fields are data, "):
    cli.load_config(TINY, ["no_such_key"])
  with pytest.raises(ConfigError, match=r"^--config.seed.x: config.seed is a value, not a section"):
    cli.load_config(TINY, ["seed.x"])
  with pytest.raises(ConfigError, match=r"config.model.taper.widths has no item \[0\]"):
    cli.load_config(TINY, ["model.taper.widths[0]"])


def test_a_config_file_loads_without_an_arg_and_is_locked():
  config = parse(["prog", "--config", f"{REPO}/configs/demo.py", "--config.train.steps=5"])
  assert config.train.steps == 5 and config.is_locked


def test_a_workdirs_config_json_loads_with_overrides(tmp_path):
  saved = load_config("tlm_transformer", "tiny,linear")
  saved.train.steps = 11
  path = tmp_path / "config.json"
  path.write_text(saved.to_json_best_effort())
  config = parse(["prog", "--config", str(path), "--config.model.taper.start=1.25"])
  assert config.model.taper.schedule == "linear" and config.train.steps == 11
  assert config.model.taper.start == 1.25
  with pytest.raises(ConfigError, match="did you mean 'config.train.steps'"):
    parse(["prog", "--config", str(path), "--config.train.stesp=3"])


@pytest.mark.parametrize(
  "flag, settings",
  [
    ("--max_new_tokens=-5", (-5, 0.0, 0, 1.0)),
    ("--temperature=-1", (64, -1.0, 0, 1.0)),
    ("--top_k=-1", (64, 1.0, -1, 1.0)),
    ("--top_p=0", (64, 1.0, 0, 0)),
    ("--top_p=1.5", (64, 1.0, 0, 1.5)),
  ],
)
def test_generate_rejects_sampling_flags_that_cannot_work(flag, settings):
  with pytest.raises(ConfigError, match=f"^{flag}: should be"):
    generate.check_sampling(*settings)
  generate.check_sampling(64, 0.7, 40, 0.9)


def test_a_bad_config_is_one_error_line_and_exit_status_2():
  result = subprocess.run(
    [sys.executable, "-m", "tlm_jax.taper", "--config", "configs/nonexistent.py"],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode == 2
  assert result.stderr.splitlines() == [
    "error: --config configs/nonexistent.py: no such file "
    "(give FILE.py[:ARG] or a workdir's config.json)"
  ]
