"""Late-Stage LoRA (hyperfitting) and terminal expansion (arXiv 2605.22579).

    python -m tlm_jax.analysis.hyperfit --workdir W --data FILE [--layers 5 --rank 8 --epochs 20]

LoRA adapters (`lora.py`: rank r, attention and MLP projections) on the last
k layers only, base weights frozen, fine-tuned with Adam and no weight decay
towards zero loss on a small set (--data: .txt, one sample per non-empty
line, or .jsonl with a text field; ~2,000 samples in the paper) whose last
--heldout samples are kept out. Adapters, optimizer state and step are Orbax
checkpoints in W/hyperfit/checkpoints (W/hyperfit/settings.json records what
they were trained with); a rerun resumes, or reuses them when finished.

Before and after, on the held-out samples:
- generations from their first --prompt_tokens tokens, sampled at
  --temperature with a fixed key: type-token ratio, bigram and trigram
  repetition rate (repeated n-grams / n-grams), mean next-token entropy of
  the distribution sampled from, and top-1 agreement with the base model on
  the same contexts;
- the control (the paper's falsification test): the base model with its
  temperature scaled so that its mean next-token entropy on the held-out text
  equals the hyperfitted model's. If hyperfitting only sharpened the
  distribution, the control reproduces its diversity (it cannot change top-1);
- per layer, the effective dimensionality of the residual stream after the
  block: the participation ratio (sum l)^2 / sum l^2 of its covariance
  eigenvalues l. Where it grows in the adapted layers is the "terminal
  expansion". In an X-shaped model the state after block l is its output at
  its own residual width d_l (the coordinates it wrote; those it does not
  see are an earlier block's state).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from matplotlib.figure import Figure

from tlm_jax import cli, generate, restore
from tlm_jax.analysis import blocks, load, lora
from tlm_jax.data import tokenizers
from tlm_jax.errors import ConfigError
from tlm_jax.model import lm


def entropy(logits_NV: jax.Array, temperature: jax.Array | float = 1.0) -> jax.Array:
  logp = jax.nn.log_softmax(logits_NV.astype(jnp.float32) / temperature, axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def sample(
  model: lm.Decoder,
  prompts_NP: np.ndarray,
  new_tokens: int,
  length: int,
  temperature: float,
  seed: int,
) -> np.ndarray:
  """(N, length): the prompts, their continuations (tlm_jax.generate, temperature 0 greedy)
  and zeros after them (one shape for every call, so teacher forcing on the result reuses
  the compiled forward pass)."""
  n, p = prompts_NP.shape
  if p + new_tokens > length:
    raise ConfigError(
      f"--prompt_tokens={p} + --new_tokens={new_tokens} exceed the window of {length} tokens"
    )
  new = generate.generate_tokens(
    model,
    prompts_NP.tolist(),
    max_new_tokens=new_tokens,
    eos_id=-1,  # no id is -1: every row gets new_tokens
    temperature=temperature,
    seed=seed,
  )
  buffer = np.zeros((n, length), np.int32)
  buffer[:, :p] = prompts_NP
  buffer[:, p : p + new_tokens] = new
  return buffer


def repetition(sequence: Sequence[int], n: int) -> float:
  """Share of a sequence's n-grams that repeat an earlier one."""
  grams = [tuple(sequence[i : i + n]) for i in range(len(sequence) - n + 1)]
  return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def diversity(generated_NG: np.ndarray) -> dict[str, float]:
  """Type-token ratio and bigram/trigram repetition rate, averaged over sequences."""
  seqs = [list(map(int, row)) for row in generated_NG]
  return dict(
    type_token_ratio=float(np.mean([len(set(s)) / len(s) for s in seqs])),
    bigram_repetition=float(np.mean([repetition(s, 2) for s in seqs])),
    trigram_repetition=float(np.mean([repetition(s, 3) for s in seqs])),
  )


def participation_ratio_from_covariance(cov_DD: np.ndarray) -> float:
  """(sum l)^2 / sum l^2 over the covariance's eigenvalues l: between 1 and D."""
  eig = np.clip(np.linalg.eigvalsh(np.asarray(cov_DD, np.float64)), 0.0, None)
  return float(eig.sum() ** 2 / max((eig**2).sum(), 1e-300))


def participation_ratio(h_ND: np.ndarray) -> float:
  """Effective dimensionality of N samples of a D-dimensional state."""
  return participation_ratio_from_covariance(np.cov(np.asarray(h_ND, np.float64), rowvar=False))


def hidden_moments(
  model: lm.Decoder, tokens_BT: jax.Array, mask_BT: jax.Array
) -> tuple[list[jax.Array], list[jax.Array]]:
  """Per layer, the block's output (at its residual width d_l) over masked tokens: the sums
  x (d_l,) and x x^T (d_l, d_l)."""
  positions_BT = blocks.positions_like(tokens_BT)
  stream_BTD, firsts, seconds = model.embed_tokens(tokens_BT), [], []
  for block, width in zip(model.blocks, model.residual_widths):
    x_BTD = blocks.run_block(block, lm.read_width(stream_BTD, width), positions_BT)
    stream_BTD = lm.write_width(stream_BTD, x_BTD)
    x = x_BTD.astype(jnp.float32) * mask_BT[..., None]
    firsts.append(x.sum((0, 1)))
    seconds.append(jnp.einsum("btd,bte->de", x, x))
  return firsts, seconds


def layer_participation(model: lm.Decoder, data: dict[str, np.ndarray]) -> list[float]:
  fn = blocks.jit_method(model, hidden_moments)
  firsts, seconds = jax.device_get(fn(data["inputs"], data["mask"]))
  n, ratios = float(data["mask"].sum()), []
  for first, second in zip(firsts, seconds):
    mean = np.asarray(first, np.float64) / n
    cov = np.asarray(second, np.float64) / n - mean[:, None] * mean[None, :]
    ratios.append(participation_ratio_from_covariance(cov))
  return ratios


@jax.jit
def mean_entropy(logits_NTV: jax.Array, weights_NT: jax.Array, temperature: jax.Array) -> jax.Array:
  return jnp.sum(entropy(logits_NTV, temperature) * weights_NT)


def match_temperature(base_NTV: jax.Array, target_entropy: float, mask_NT: np.ndarray) -> float:
  """The temperature at which the base model's mean next-token entropy (over the masked
  positions) is `target_entropy`: bisection in log T over [0.01, 100]."""
  weights = jnp.asarray(mask_NT / mask_NT.sum(), jnp.float32)
  lo, hi = math.log(1e-2), math.log(1e2)
  for _ in range(40):
    mid = (lo + hi) / 2
    below = float(mean_entropy(base_NTV, weights, np.float32(math.exp(mid)))) < target_entropy
    lo, hi = (mid, hi) if below else (lo, mid)
  return math.exp((lo + hi) / 2)


def logits(model: lm.Decoder, tokens_BT: np.ndarray) -> jax.Array:
  return blocks.jit_method(model, lm.Decoder.__call__)(tokens_BT)


def generation_report(
  model: lm.Decoder,
  base: lm.Decoder,
  sequences_NS: np.ndarray,
  prompt_tokens: int,
  new_tokens: int,
  temperature: float,
) -> dict[str, float]:
  """Diversity of the continuations (`sample`'s output); teacher-forced on them, the mean
  entropy of the distribution they were sampled from and the top-1 agreement with the base."""
  at = slice(prompt_tokens - 1, prompt_tokens + new_tokens - 1)
  own, reference = logits(model, sequences_NS)[:, at], logits(base, sequences_NS)[:, at]
  return dict(
    **diversity(sequences_NS[:, prompt_tokens : prompt_tokens + new_tokens]),
    entropy=float(entropy(own, temperature or 1.0).mean()),
    top1_agreement=float(jnp.mean(jnp.argmax(own, -1) == jnp.argmax(reference, -1))),
  )


def analyze_model(
  model: lm.Decoder,
  tokenizer: Any,
  texts: Sequence[str],
  settings: lora.Settings,
  length: int,
  *,
  heldout: int = 32,
  prompt_tokens: int = 16,
  new_tokens: int = 48,
  temperature: float = 1.0,
  directory: str | None = None,
) -> tuple[dict[str, Any], lora.Adapters]:
  """Fine-tune on all but the last `heldout` texts (windows of `length` tokens), then compare
  the base and hyperfitted models. Returns the result and the adapters."""
  if not 0 < heldout < len(texts):
    raise ConfigError(f"--heldout={heldout} must leave samples to train on ({len(texts)} given)")
  train_data = lora.encode(texts[:-heldout], tokenizer, length)
  held = lora.encode(texts[-heldout:], tokenizer, length)
  long_enough = held["mask"].sum(1) >= prompt_tokens
  if not long_enough.any():
    raise ConfigError(f"no held-out sample has --prompt_tokens={prompt_tokens} tokens")
  adapters, _ = lora.train(model, train_data, settings, directory)
  graphdef, params = nnx.split(model)
  tuned = nnx.merge(
    graphdef, lora.merge_adapters(nnx.to_pure_dict(params), adapters, settings.scale)
  )
  zero = jax.tree.map(jnp.zeros_like, adapters)
  losses = {
    f"{name}_loss": dict(
      before=lora.mean_loss(model, zero, settings.scale, data, settings.batch_size),
      after=lora.mean_loss(model, adapters, settings.scale, data, settings.batch_size),
    )
    for name, data in (("train", train_data), ("heldout", held))
  }

  weights = jnp.asarray(held["mask"] / held["mask"].sum())
  tuned_entropy = float(mean_entropy(logits(tuned, held["inputs"]), weights, np.float32(1)))
  control = match_temperature(logits(model, held["inputs"]), tuned_entropy, held["mask"])
  prompts = held["inputs"][long_enough, :prompt_tokens]
  conditions = dict(
    base=(model, temperature),
    hyperfit=(tuned, temperature),
    temperature_control=(model, temperature * control),
  )
  generation: dict[str, Any] = dict(
    prompts=len(prompts),
    prompt_tokens=prompt_tokens,
    new_tokens=new_tokens,
    temperature=temperature,
  )
  examples = {}
  for name, (which, temp) in conditions.items():
    sequences = sample(which, prompts, new_tokens, length, temp, settings.seed)
    report = generation_report(which, model, sequences, prompt_tokens, new_tokens, temp)
    generation[name] = report
    examples[name] = [tokenizer.decode(s) for s in sequences[:3, : prompt_tokens + new_tokens]]

  result = dict(
    settings=dataclasses.asdict(settings),
    layers=lora.adapted_layers(len(model.blocks), settings.layers),
    residual_widths=[int(d) for d in model.residual_widths],
    adapted_weights=sorted(adapters),
    trainable_params=int(sum(x.size for x in jax.tree.leaves(adapters))),
    train_samples=len(train_data["inputs"]),
    heldout_samples=heldout,
    **losses,
    temperature_control=control,
    generation=generation,
    examples=examples,
    participation_ratio=dict(
      base=layer_participation(model, held), hyperfit=layer_participation(tuned, held)
    ),
  )
  return result, adapters


def check_settings(directory: str, settings: lora.Settings, data: str) -> None:
  """A hyperfit folder belongs to one set of settings and data file: refuse to mix them.
  Only --epochs may change (more epochs continue the run, as train.steps does)."""
  path = os.path.join(directory, "settings.json")
  wanted = dict(dataclasses.asdict(settings), data=os.path.abspath(data))
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    changed = sorted(k for k in wanted if k != "epochs" and saved.get(k) != wanted[k])
    if changed:
      raise ConfigError(
        f"{directory} holds adapters trained with other settings ({', '.join(changed)}); "
        "pass the same flags, or remove that folder to start over"
      )
  os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(wanted, f, indent=1)


def analyze(
  restored: restore.Restored,
  data: str,
  settings: lora.Settings,
  text_field: str = "text",
  **kwargs: Any,
) -> dict[str, Any]:
  """Hyperfit a workdir's model on --data, adapters and checkpoints in W/hyperfit/."""
  texts = lora.read_texts(data, text_field)
  directory = os.path.join(restored.workdir, "hyperfit")
  check_settings(directory, settings, data)
  tokenizer = tokenizers.make_tokenizer(restored.config.data)
  result, _ = analyze_model(
    restored.model,
    tokenizer,
    texts,
    settings,
    restored.config.train.seq_len,
    directory=os.path.join(directory, "checkpoints"),
    **kwargs,
  )
  info = dict(
    workdir=restored.workdir, label=restored.label, step=restored.step, data=os.path.abspath(data)
  )
  return dict(**info, backbone=restored.config.model.backbone, **result)


def plot(result: dict[str, Any]) -> Figure:
  fig = Figure(figsize=(12, 4))
  left, right = fig.subplots(1, 2)
  pr = result["participation_ratio"]
  left.plot(pr["base"], marker="o", label="base")
  left.plot(pr["hyperfit"], marker="o", label=f"hyperfit (last {len(result['layers'])} layers)")
  left.axvspan(result["layers"][0] - 0.5, result["layers"][-1] + 0.5, color="C1", alpha=0.1)
  left.set_xlabel("layer (stream after the block)")
  left.set_title("participation ratio of hidden states")
  left.legend(fontsize=8)
  left.grid(alpha=0.3)
  gen = result["generation"]
  metrics = ("type_token_ratio", "bigram_repetition", "trigram_repetition", "top1_agreement")
  conditions = ("base", "hyperfit", "temperature_control")
  for c, name in enumerate(conditions):
    x = np.arange(len(metrics)) + (c - 1) * 0.27
    right.bar(x, [gen[name][m] for m in metrics], width=0.27, label=name)
  right.set_xticks(np.arange(len(metrics)), [m.replace("_", "\n") for m in metrics], fontsize=8)
  right.set_title(
    f"generations (control: base at T x {result['temperature_control']:.2f}); {result['label']}"
  )
  right.legend(fontsize=8)
  fig.tight_layout()
  return fig


def main(argv: Sequence[str]) -> None:
  del argv
  restored = restore.latest(_WORKDIR.value)
  settings = lora.Settings(
    layers=_LAYERS.value,
    rank=_RANK.value,
    alpha=_ALPHA.value,
    learning_rate=_LEARNING_RATE.value,
    epochs=_EPOCHS.value,
    batch_size=_BATCH_SIZE.value,
    seed=_SEED.value,
  )
  result = analyze(
    restored,
    _DATA.value,
    settings,
    _TEXT_FIELD.value,
    heldout=_HELDOUT.value,
    prompt_tokens=_PROMPT_TOKENS.value,
    new_tokens=_NEW_TOKENS.value,
    temperature=_TEMPERATURE.value,
  )
  print(load.write_json(restored.workdir, "hyperfit", result))
  print(load.save_figure(plot(result), restored.workdir, "hyperfit"))


if __name__ == "__main__":
  from absl import flags

  defaults = lora.Settings()
  _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.")
  _DATA = flags.DEFINE_string("data", None, "Small set: .txt (a sample per line) or .jsonl.")
  _TEXT_FIELD = flags.DEFINE_string("text_field", "text", "JSONL key holding the text.")
  _LAYERS = flags.DEFINE_integer(
    "layers", defaults.layers, "Adapt the last k layers.", lower_bound=1
  )
  _RANK = flags.DEFINE_integer("rank", defaults.rank, "LoRA rank r.", lower_bound=1)
  _ALPHA = flags.DEFINE_float(
    "alpha", defaults.alpha, "LoRA alpha (scale alpha / r).", lower_bound=0
  )
  _LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", defaults.learning_rate, "Adam step size.", lower_bound=0
  )
  _EPOCHS = flags.DEFINE_integer(
    "epochs", defaults.epochs, "Passes over the small set.", lower_bound=1
  )
  _BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", defaults.batch_size, "Samples per step.", lower_bound=1
  )
  _SEED = flags.DEFINE_integer("seed", defaults.seed, "Adapter init, data order and sampling.")
  _HELDOUT = flags.DEFINE_integer("heldout", 32, "Last samples kept out of training (prompts).")
  _PROMPT_TOKENS = flags.DEFINE_integer("prompt_tokens", 16, "Prompt length in tokens.")
  _NEW_TOKENS = flags.DEFINE_integer("new_tokens", 48, "Tokens generated per prompt.")
  _TEMPERATURE = flags.DEFINE_float(
    "temperature", 1.0, "Sampling temperature (0: greedy).", lower_bound=0
  )
  flags.mark_flags_as_required(["workdir", "data"])
  cli.run(main)
