"""Hugging Face export (tlm_jax/export_hf.py): the exported model loaded by transformers
computes the JAX model's logits, decodes greedily as tlm_jax.generate does, its tokenizer
encodes as ours, lm-eval's `hf` model scores as our Scorer, and the export reads back into
the same params bit for bit."""

import json
import os
import subprocess
import sys

import grain
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

import helpers
from tlm_jax import checkpoint, export_hf, generate, restore, state, tasks
from tlm_jax import workdir as workdir_lib
from tlm_jax.data import tokenizers
from tlm_jax.errors import ConfigError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENS = np.random.default_rng(0).integers(1, 256, (2, 64))

# (backbone, gate, gate_bias, tied, layers_mode): each export feature at least once.
VARIANTS = {
  "transformer": ("transformer", "elementwise", False, False, "unrolled"),
  "transformer_tied_grouped": ("transformer", "elementwise", False, True, "grouped"),
  "gated_elementwise_bias_grouped": ("gated_attention", "elementwise", True, False, "grouped"),
  "gated_headwise_tied": ("gated_attention", "headwise", False, True, "unrolled"),
}


def tiny_config(backbone, gate="elementwise", gate_bias=False, tied=False, layers_mode="unrolled"):
  """configs/*.py:tiny (float32, d 64, 4 query heads over 2 kv heads): cosine widths 384,
  320, 192, 128 unrolled; grouped, a 2-step stepped cosine (2 stacks of 2 equal layers)."""
  config = helpers.load_config(f"tlm_{backbone}", "tiny")
  config.model.update(gate=gate, gate_bias=gate_bias, tie_embeddings=tied, layers_mode=layers_mode)
  if layers_mode == "grouped":
    config.model.taper.update(schedule="stepped", steps=2)
  config.train.seq_len = 64
  return config


def save_workdir(path, config, seed=0):
  """A workdir as training leaves it (config.json, widths.json, a checkpoint) holding random
  params far from init (norms and gate biases too), without training."""
  os.makedirs(path)
  workdir_lib.write_config(str(path), config)
  model = state.build_model(config, seed)
  workdir_lib.write_widths(str(path), model.widths)
  rng = np.random.default_rng(seed)
  flat = []
  for key, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(variable[...])
    noise = rng.standard_normal(value.shape).astype(value.dtype)
    if key[-1] == "scale":  # norm scales
      value = 1 + 0.2 * noise
    elif key[-1] == "b_gate":
      value = 0.5 * noise
    else:
      value = 0.08 * noise
    flat.append((key, variable.replace(value)))
  params = nnx.from_flat_state(flat)
  ckpt = checkpoint.Checkpointer(workdir_lib.path(str(path), workdir_lib.CHECKPOINTS), keep=1)
  ckpt.save(1, dict(params=params), iter(grain.MapDataset.range(4).batch(2)), force=True)
  ckpt.close()
  return str(path)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("export_workdirs")
  return {name: save_workdir(root / name, tiny_config(*v)) for name, v in VARIANTS.items()}


@pytest.fixture(scope="module")
def exports(workdirs, tmp_path_factory):
  root = tmp_path_factory.mktemp("exports")
  out = {name: str(root / name) for name in workdirs}
  for name, workdir in workdirs.items():
    export_hf.export(workdir, out[name])
  out["llama"] = str(root / "llama")
  export_hf.export(workdirs["transformer"], out["llama"], "llama")
  return out


def jax_logits(workdir):
  model = restore.latest(workdir).model
  return np.asarray(helpers.forward(model, TOKENS))


def torch_logits(model):
  with torch.no_grad():
    return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_through_auto_model(name, workdirs, exports):
  model = transformers.AutoModelForCausalLM.from_pretrained(
    exports[name], trust_remote_code=True, dtype=torch.float32
  )
  config = json.load(open(os.path.join(exports[name], "config.json")))
  assert config["intermediate_size"] == workdir_lib.read_widths(workdirs[name])
  assert len(set(config["intermediate_size"])) > 1
  diff = np.abs(torch_logits(model) - jax_logits(workdirs[name])).max()
  print(f"{name}: max abs logit difference {diff:.2e}")
  assert diff < 1e-4
