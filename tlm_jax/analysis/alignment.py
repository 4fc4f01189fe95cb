"""Residual alignment: how far each sublayer's update points along the stream it is added to.

    python -m tlm_jax.analysis.alignment --workdir W [--workdir W2 | --workdir W,W2]

TLM explains its result by this measurement: later MLPs' outputs align more
and more with the residual stream, so late layers refine rather than
transform, and narrow late MLPs lose little. Per layer and sublayer (mixer,
then MLP), over validation tokens:

    cosine         cos(u_t, x_t)   u: the sublayer's output, x: the stream it is added to
    relative norm  |u_t| / |x_t|   how large the update is against the stream

each as a mean and a standard deviation over tokens, beside the layer's MLP
width. For the mixer x is the block's input; for the MLP it is the stream
after the mixer's update (what `Block` adds the MLP output to). In an
X-shaped model (tlm_jax/xshape.py) a block reads and adds to the stream at its
own residual width d_l (lm.read_width), so u and x are both that view, d_l
wide: the coordinates the block does not see pass it unchanged and take no
part in its cosine or norms (its residual_width is reported beside it). Writes
W/analysis_alignment.json per workdir; the PNG overlays every workdir given
(tapered against uniform) and is written into each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tlm_jax import cli, restore
from tlm_jax.analysis import blocks, load
from tlm_jax.model import lm

SUBLAYERS = ("mixer", "mlp")
MOMENTS = ("cosine", "cosine_sq", "relative_norm", "relative_norm_sq")


def update_moments(u_BTD: jax.Array, x_BTD: jax.Array) -> jax.Array:
  """Sums over tokens of cos, cos^2, |u|/|x|, (|u|/|x|)^2: shape (4,)."""
  u, x = u_BTD.astype(jnp.float32), x_BTD.astype(jnp.float32)
  u_norm, x_norm = jnp.linalg.norm(u, axis=-1), jnp.linalg.norm(x, axis=-1)
  cos = jnp.sum(u * x, axis=-1) / jnp.maximum(u_norm * x_norm, 1e-30)
  rel = u_norm / jnp.maximum(x_norm, 1e-30)
  return jnp.stack([cos.sum(), (cos * cos).sum(), rel.sum(), (rel * rel).sum()])


def moments(model: lm.Decoder, tokens_BT: jax.Array) -> jax.Array:
  """(L, 2, 4): per layer, for the mixer and the MLP, the sums of `update_moments`."""
  positions_BT = blocks.positions_like(tokens_BT)
  stream_BTD, rows = model.embed_tokens(tokens_BT), []
  for block, width in zip(model.blocks, model.residual_widths):
    x_BTD = lm.read_width(stream_BTD, width)
    u_BTD = blocks.mixer_update(block, x_BTD, positions_BT)
    mixer = update_moments(u_BTD, x_BTD)
    x_BTD = x_BTD + u_BTD
    u_BTD = blocks.mlp_update(block, x_BTD)
    rows.append(jnp.stack([mixer, update_moments(u_BTD, x_BTD)]))
    stream_BTD = lm.write_width(stream_BTD, x_BTD + u_BTD)
  return jnp.stack(rows)


def analyze_model(model: lm.Decoder, batches: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
  """Per-layer alignment of a decoder over batches {'inputs': (B, T) tokens}; see the module
  doc."""
  fn = blocks.jit_method(model, moments)
  total, count = 0.0, 0
  for batch in batches:
    total = total + np.asarray(jax.device_get(fn(batch["inputs"])), np.float64)
    count += batch["inputs"].size
  mean = total / count
  layers = []
  for l, (width, residual) in enumerate(zip(model.widths, model.residual_widths)):
    row: dict[str, Any] = dict(layer=l, mlp_width=int(width), residual_width=int(residual))
    for s, name in enumerate(SUBLAYERS):
      cos, cos_sq, rel, rel_sq = mean[l, s]
      row[name] = dict(
        cosine_mean=float(cos),
        cosine_std=float(np.sqrt(max(cos_sq - cos * cos, 0.0))),
        relative_norm_mean=float(rel),
        relative_norm_std=float(np.sqrt(max(rel_sq - rel * rel, 0.0))),
      )
    layers.append(row)
  return dict(
    tokens=count,
    widths=[int(w) for w in model.widths],
    residual_widths=[int(d) for d in model.residual_widths],
    layers=layers,
  )


def analyze(restored: restore.Restored, batches: int, batch_size: int) -> dict[str, Any]:
  data = load.validation_batches(restored.config, batches, batch_size)
  result = analyze_model(restored.model, data)
  info = dict(workdir=restored.workdir, label=restored.label, step=restored.step)
  return dict(**info, backbone=restored.config.model.backbone, **result)


def plot(results: Sequence[dict[str, Any]]) -> Figure:
  """Four panels per layer (MLP cosine, mixer cosine, relative norms, MLP width), one line
  per run, shaded one standard deviation."""
  fig = Figure(figsize=(11, 7))
  axes = fig.subplots(2, 2).ravel()
  for result in results:
    label, layers = result["label"], [r["layer"] for r in result["layers"]]
    for ax, sublayer in zip(axes[:2], ("mlp", "mixer")):
      mean = np.array([r[sublayer]["cosine_mean"] for r in result["layers"]])
      std = np.array([r[sublayer]["cosine_std"] for r in result["layers"]])
      (line,) = ax.plot(layers, mean, marker="o", label=label)
      ax.fill_between(layers, mean - std, mean + std, color=line.get_color(), alpha=0.15)
    for sublayer, style in (("mlp", "-"), ("mixer", "--")):
      rel = [r[sublayer]["relative_norm_mean"] for r in result["layers"]]
      axes[2].plot(layers, rel, style, marker=".", label=f"{label} {sublayer}")
    axes[3].plot(layers, result["widths"], marker="s", label=label)
  titles = (
    "cos(MLP output, residual)",
    "cos(mixer output, residual)",
    "|update| / |residual|",
    "MLP width",
  )
  for ax, title in zip(axes, titles):
    ax.set_title(title)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  return fig


def main(argv: Sequence[str]) -> None:
  del argv
  workdirs = load.workdir_list(_WORKDIR.value)
  results = [analyze(restore.latest(w), _BATCHES.value, _BATCH_SIZE.value) for w in workdirs]
  fig = plot(results)
  written = []
  for result in results:
    written.append(load.write_json(result["workdir"], "alignment", result))
    written.append(load.save_figure(fig, result["workdir"], "alignment"))
  print("\n".join(written))


if __name__ == "__main__":
  from absl import flags

  _WORKDIR = flags.DEFINE_multi_string(
    "workdir", None, "Training run folder(s): repeat the flag or give a comma list."
  )
  _BATCHES = flags.DEFINE_integer("batches", 4, "Validation batches to average over.")
  _BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Sequences per batch (0: train.batch_size).")
  flags.mark_flag_as_required("workdir")
  cli.run(main)
