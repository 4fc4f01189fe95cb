"""A trained workdir as a Hugging Face transformers model folder.

    python -m tlm_jax.export_hf --workdir W --out D [--format tlm|llama] [--dtype float32|bfloat16]

`--format tlm` (default) writes the model as it is: `config.json` (Llama's fields, with
`intermediate_size` the list of per-layer MLP widths of W/widths.json, and `auto_map` to
the remote code), `configuration_tlm.py` and `modeling_tlm.py` (tlm_jax/hf/, torch and
transformers only), `model.safetensors` (Llama's parameter names, plus
`self_attn.gate_proj` for Gated Attention), tokenizer files and `generation_config.json`:

    AutoModelForCausalLM.from_pretrained(D, trust_remote_code=True)

`--format llama` (Transformer only) zero-pads every MLP to the widest layer, which is
exact (silu(0) * 0 = 0), so stock `LlamaForCausalLM` loads it with no remote code (vLLM,
llama.cpp, any Llama tool); it prints what the padding costs in params and FLOPs.

The tokenizer is the workdir's as `tokenizer.json` (the `tokenizers` library: bytes, a
SentencePiece BPE converted, or data.hf_tokenizer's own): encoding a text with
`add_special_tokens=False` gives our ids; the default puts the separator (our EOS, the token
every training document follows) in front, as tlm_jax's generate, scorer and lm-eval adapter
do, and `skip_special_tokens=True` decodes as ours; text that spells a special token stays
text (`split_special_tokens`), as in ours. D/tlm_jax_config.json is the workdir's config and
D/tlm_jax.json records the step, the widths and (llama format) the padding's cost; `load(D)`
reads the params back.

The export computes in its weights' dtype: a model trained with model.dtype=bfloat16
exported in float32 gives logits a little more exact than the JAX model's. Titans, Hope,
sliding windows, persistent tokens and the X shape are not exported yet (a one-line error
naming the field). Needs the [hf] extra (`pip install -e '.[hf]'`).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import tokenizers as hf
from absl import flags
from etils import epath
from flax import nnx
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from tlm_jax import cli, restore, state
from tlm_jax import config as config_lib
from tlm_jax import workdir as workdir_lib
from tlm_jax.data import tokenizers
from tlm_jax.errors import ConfigError
from tlm_jax.model import budget, lm
from tlm_jax.spec import ModelSpec

FORMATS = ("tlm", "llama")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
BACKBONES = ("transformer", "gated_attention")
REMOTE_CODE = ("configuration_tlm.py", "modeling_tlm.py")
REMOTE_CODE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
WEIGHTS = "model.safetensors"
INFO = "tlm_jax.json"  # the workdir, step, widths, format, dtype; the llama format's padding
CONFIG = "tlm_jax_config.json"  # the workdir's config (layers unrolled), for `load`
BYTE_SEPARATOR = "<|endoftext|>"  # the byte tokenizer's id 0


def check_exportable(spec: ModelSpec, export_format: str) -> None:
  """ConfigError naming the first field the export cannot carry yet."""
  if export_format not in FORMATS:
    raise ConfigError(f"--format={export_format!r} is unknown; use one of {FORMATS}")
  if spec.backbone not in BACKBONES:
    raise ConfigError(
      f"model.backbone={spec.backbone!r} is not exported to Hugging Face yet; "
      f"export_hf takes {BACKBONES}"
    )
  if export_format == "llama" and spec.backbone != "transformer":
    raise ConfigError(
      f"model.backbone={spec.backbone!r}: --format llama is the plain Transformer (Llama has "
      "no attention gate); use --format tlm"
    )
  if spec.attention_window:
    raise ConfigError(
      f"model.attention_window={spec.attention_window}: sliding-window attention is not "
      "exported to Hugging Face yet; export a model trained with attention_window=0"
    )
  if spec.persistent_tokens:
    raise ConfigError(
      f"model.persistent_tokens={spec.persistent_tokens}: persistent key/value slots are not "
      "exported to Hugging Face yet; export a model trained with persistent_tokens=0"
    )
  if spec.residual.schedule != "uniform":
    raise ConfigError(
      f"model.residual.schedule={spec.residual.schedule!r}: the X-shaped residual stream is "
      "not exported to Hugging Face yet; export a model with a uniform residual stream"
    )


# ---------------------------------------------------------------------------
# Params: tlm_jax paths <-> Hugging Face names.
# ---------------------------------------------------------------------------


def _layer_names(spec: ModelSpec) -> dict[tuple[str, ...], tuple[str, str]]:
  """Within block l: tlm_jax path -> (name under model.layers.l, how the array turns into
  the torch Linear's (out, in) weight: 'in_out' transposes a (d, ...) kernel, 'out_in' a
  (..., d) one, 'vector' stays)."""
  names = {
    ("mixer_norm", "scale"): ("input_layernorm.weight", "vector"),
    ("mixer", "w_q"): ("self_attn.q_proj.weight", "in_out"),
    ("mixer", "w_k"): ("self_attn.k_proj.weight", "in_out"),
    ("mixer", "w_v"): ("self_attn.v_proj.weight", "in_out"),
    ("mixer", "w_o"): ("self_attn.o_proj.weight", "out_in"),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", "vector"),
    ("mlp", "w_gate"): ("mlp.gate_proj.weight", "in_out"),
    ("mlp", "w_up"): ("mlp.up_proj.weight", "in_out"),
    ("mlp", "w_down"): ("mlp.down_proj.weight", "out_in"),
  }
  if spec.backbone == "gated_attention":
    names[("mixer", "w_gate")] = ("self_attn.gate_proj.weight", "in_out")
    if spec.gate_bias:
      names[("mixer", "b_gate")] = ("self_attn.gate_proj.bias", "vector")
  return names


def _to_hf(value: np.ndarray, layout: str) -> np.ndarray:
  if layout == "in_out":  # (d, n, h) / (d, f) -> (n * h, d) / (f, d)
    return value.reshape(value.shape[0], -1).T
  if layout == "out_in":  # (n, h, d) / (f, d) -> (d, n * h) / (d, f)
    return value.reshape(-1, value.shape[-1]).T
  return value.reshape(-1)


def _from_hf(value: np.ndarray, layout: str, shape: Sequence[int]) -> np.ndarray:
  return (value if layout == "vector" else value.T).reshape(shape)


def _pad_mlp(name: str, value: np.ndarray, width: int) -> np.ndarray:
  """An MLP weight zero-padded to `width` hidden units (gate/up rows, down columns)."""
  axis = 1 if name.endswith("down_proj.weight") else 0
  pad = [(0, 0), (0, 0)]
  pad[axis] = (0, width - value.shape[axis])
  return np.pad(value, pad)


def hf_tensors(
  params: nnx.State, spec: ModelSpec, widths: Sequence[int], pad_to: int = 0
) -> dict[str, np.ndarray]:
  """Hugging Face name -> array (the params' dtype) of an unrolled decoder's params; with
  pad_to, every MLP zero-padded to that width (the llama format)."""
  names = _layer_names(spec)
  flat = {path: np.asarray(jax.device_get(v[...])) for path, v in nnx.to_flat_state(params)}
  out = {
    "model.embed_tokens.weight": flat[("embed",)],
    "model.norm.weight": flat[("final_norm", "scale")],
  }
  if not spec.tie_embeddings:
    out["lm_head.weight"] = flat[("head",)].T
  for l in range(len(widths)):
    for rest, (name, layout) in names.items():
      value = _to_hf(flat[("blocks", l, *rest)], layout)
      if pad_to and name.startswith("mlp."):
        value = _pad_mlp(name, value, pad_to)
      out[f"model.layers.{l}.{name}"] = value
  missing = (
    set(flat)
    - {("embed",), ("final_norm", "scale"), ("head",)}
    - {("blocks", l, *rest) for l in range(len(widths)) for rest in names}
  )
  if missing:  # a param this exporter does not know would be silently dropped
    raise ConfigError(f"export_hf does not know the params {sorted(missing)[:3]}")
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def params_from_hf(
  tensors: dict[str, np.ndarray], abstract: nnx.State, spec: ModelSpec, widths: Sequence[int]
) -> nnx.State:
  """hf_tensors undone into the shapes of `abstract` (an unrolled decoder's params);
  padded MLP units are cut off."""
  names = _layer_names(spec)
  flat = []
  for path, variable in nnx.to_flat_state(abstract):
    if path == ("embed",):
      value = tensors["model.embed_tokens.weight"]
    elif path == ("final_norm", "scale"):
      value = tensors["model.norm.weight"]
    elif path == ("head",):
      value = tensors["lm_head.weight"].T
    else:
      l, rest = path[1], path[2:]
      name, layout = names[rest]
      value = tensors[f"model.layers.{l}.{name}"]
      if name.startswith("mlp."):
        value = value[:, : widths[l]] if name.endswith("down_proj.weight") else value[: widths[l]]
      value = _from_hf(value, layout, variable.shape)
    flat.append((path, variable.replace(jnp.asarray(value, variable.dtype))))
  return nnx.from_flat_state(flat)


# ---------------------------------------------------------------------------
# safetensors (written with the library; read here, since its numpy reader lacks bfloat16)
# ---------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F16": np.float16}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Every tensor of a .safetensors file as a numpy array of its own dtype."""
  with open(path, "rb") as f:
    raw = f.read()
  (size,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8 : 8 + size])
  header.pop("__metadata__", None)
  data = memoryview(raw)[8 + size :]
  out = {}
  for name, entry in header.items():
    start, end = entry["data_offsets"]
    dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
    out[name] = np.frombuffer(data[start:end], dtype).reshape(entry["shape"])
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  try:
    from safetensors.numpy import save_file
  except ImportError as e:
    raise ConfigError(f"export_hf needs the [hf] extra ({e}): pip install -e '.[hf]'") from e
  save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------
# Tokenizers as tokenizer.json
# ---------------------------------------------------------------------------


def _byte_tokenizer() -> Any:
  """One id per UTF-8 byte (ids = byte values, as ByteTokenizer), id 0 the separator
  BYTE_SEPARATOR; NUL is stripped from input, as ours strips it."""
  vocab = {char: byte for byte, char in enumerate(_byte_chars()) if byte}
  vocab[BYTE_SEPARATOR] = 0
  tok = hf.Tokenizer(hf.models.BPE(vocab=vocab, merges=[]))
  tok.normalizer = hf.normalizers.Replace("\0", "")
  tok.pre_tokenizer = hf.pre_tokenizers.ByteLevel(
    add_prefix_space=False, trim_offsets=False, use_regex=False
  )
  tok.decoder = hf.decoders.ByteLevel()
  return tok


def _byte_chars() -> list[str]:
  """The printable character the byte-level (GPT-2) scheme gives each byte 0..255: bytes
  that print stand for themselves, the others for 256, 257, ... in byte order."""
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  chars, extra = {}, 0
  for b in range(256):
    if b in keep:
      chars[b] = chr(b)
    else:
      chars[b] = chr(256 + extra)
      extra += 1
  return [chars[b] for b in range(256)]


def _spm_tokenizer(model_path: str) -> tuple[Any, list[str], str]:
  """A SentencePiece BPE model (identity normalization, whitespace kept: what
  `python -m tlm_jax.data.tokenizers` trains) as a `tokenizers` BPE with the same pieces and
  ids, merges in the order of the merged pieces' scores (SentencePiece merges the best-scored
  piece first), and byte fallback; its control and unknown pieces; its unknown piece."""
  proto = spm_pb2.ModelProto()
  proto.ParseFromString(epath.Path(model_path).read_bytes())
  norm, trainer = proto.normalizer_spec, proto.trainer_spec
  problems = []
  if trainer.model_type != spm_pb2.TrainerSpec.BPE:
    problems.append(f"model type {spm_pb2.TrainerSpec.ModelType.Name(trainer.model_type)}")
  if norm.name != "identity" or norm.precompiled_charsmap:
    problems.append(f"normalization {norm.name!r}")
  if norm.remove_extra_whitespaces:
    problems.append("remove_extra_whitespaces")
  if any(p.type == p.USER_DEFINED for p in proto.pieces):
    problems.append("user-defined symbols")
  if problems:
    raise ConfigError(
      f"data.spm_model={model_path!r} has {', '.join(problems)}; export_hf converts BPE "
      "models with identity normalization and whitespace kept, as `python -m "
      "tlm_jax.data.tokenizers` trains them"
    )
  vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  normal = {p.piece: p.score for p in proto.pieces if p.type == p.NORMAL}
  ranked = []
  for piece, score in normal.items():
    for cut in range(1, len(piece)):
      left, right = piece[:cut], piece[cut:]
      if left in normal and right in normal:
        ranked.append((-score, vocab[piece], cut, left, right))
  merges = [(left, right) for *_, left, right in sorted(ranked)]
  unk = proto.pieces[trainer.unk_id].piece
  tok = hf.Tokenizer(
    hf.models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
  )
  steps = [hf.normalizers.Replace(" ", "\u2581")]
  if norm.add_dummy_prefix:
    steps.insert(0, hf.normalizers.Prepend(" "))
  tok.normalizer = hf.normalizers.Sequence(steps)
  strip = [hf.decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else []
  tok.decoder = hf.decoders.Sequence(
    [hf.decoders.Replace("\u2581", " "), hf.decoders.ByteFallback(), hf.decoders.Fuse(), *strip]
  )
  special = [p.piece for p in proto.pieces if p.type in (p.CONTROL, p.UNKNOWN)]
  return tok, special, unk


def write_tokenizer(out: str, data_cfg: Any, tokenizer: tokenizers.Tokenizer, seq_len: int) -> None:
  """tokenizer.json and tokenizer_config.json: AutoTokenizer encodes as `tokenizer` with the
  separator (its eos_id) in front, and decodes as it with skip_special_tokens=True."""
  settings: dict[str, Any] = {}
  if isinstance(tokenizer, tokenizers.ByteTokenizer):
    tok, special = _byte_tokenizer(), [BYTE_SEPARATOR]
  elif isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    tok, special, settings["unk_token"] = _spm_tokenizer(data_cfg.spm_model)
  else:  # data.tokenizer=hf: its own tokenizer.json, with our template in front
    tok = hf.Tokenizer.from_str(epath.Path(tokenizers.hf_file(data_cfg.hf_tokenizer)).read_text())
    special = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    unknown = json.loads(tok.to_str())["model"].get("unk_token")
    if unknown:
      settings["unk_token"] = unknown
  separator = tok.id_to_token(tokenizer.eos_id)
  tok.add_special_tokens([hf.AddedToken(t, special=True, normalized=False) for t in special])
  tok.post_processor = hf.processors.TemplateProcessing(
    single=f"{separator} $A",
    pair=f"{separator} $A {separator} $B",
    special_tokens=[(separator, tokenizer.eos_id)],
  )
  tok.save(os.path.join(out, "tokenizer.json"))
  settings.update(
    tokenizer_class="PreTrainedTokenizerFast",
    bos_token=separator,
    eos_token=separator,
    pad_token=separator,
    split_special_tokens=True,
    clean_up_tokenization_spaces=False,
    model_max_length=seq_len,
    padding_side="left",
  )
  _write_json(os.path.join(out, "tokenizer_config.json"), settings)


# ---------------------------------------------------------------------------
# The export
# ---------------------------------------------------------------------------


def _write_json(path: str, value: Any) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=1)
    f.write("\n")


def hf_config(
  spec: ModelSpec,
  widths: Sequence[int],
  export_format: str,
  dtype: str,
  seq_len: int,
  separator: int,
) -> dict[str, Any]:
  """config.json: Llama's fields; intermediate_size a list (tlm) or the widest (llama)."""
  config = dict(
    vocab_size=spec.vocab_size,
    hidden_size=spec.d_model,
    intermediate_size=list(widths) if export_format == "tlm" else max(widths),
    num_hidden_layers=spec.num_layers,
    num_attention_heads=spec.num_heads,
    num_key_value_heads=spec.num_kv_heads,
    head_dim=spec.head_dim,
    hidden_act="silu",
    rms_norm_eps=spec.norm_eps,
    rope_parameters=dict(rope_type="default", rope_theta=spec.rope_theta),
    max_position_embeddings=seq_len,
    tie_word_embeddings=spec.tie_embeddings,
    initializer_range=spec.init_std,
    bos_token_id=separator,
    eos_token_id=separator,
    pad_token_id=separator,
    use_cache=True,
    dtype=dtype,
  )
  if export_format == "llama":
    config.update(
      architectures=["LlamaForCausalLM"],
      model_type="llama",
      attention_bias=False,
      mlp_bias=False,
    )
  else:
    config.update(
      architectures=["TlmForCausalLM"],
      model_type="tlm",
      auto_map={
        "AutoConfig": "configuration_tlm.TlmConfig",
        "AutoModelForCausalLM": "modeling_tlm.TlmForCausalLM",
      },
      attention_gate=spec.gate if spec.backbone == "gated_attention" else None,
      attention_gate_bias=spec.backbone == "gated_attention" and spec.gate_bias,
    )
  return config


def padding_cost(spec: ModelSpec, widths: Sequence[int], seq_len: int) -> dict[str, Any]:
  """Params and training FLOPs per token of the model, and of it with every MLP at the
  widest layer's width (the llama format)."""
  residual = [spec.d_model] * len(widths)
  padded = [max(widths)] * len(widths)
  params = budget.total_params(spec, widths, residual)
  padded_params = budget.total_params(spec, padded, residual)
  flops = budget.flops_per_token(spec, widths, residual, seq_len)
  padded_flops = budget.flops_per_token(spec, padded, residual, seq_len)
  return dict(
    padded_width=max(widths),
    params=params,
    padded_params=padded_params,
    params_overhead=padded_params / params - 1,
    flops_per_token=flops,
    padded_flops_per_token=padded_flops,
    flops_overhead=padded_flops / flops - 1,
  )


def export(
  workdir: str, out: str, export_format: str = "tlm", dtype: str = "float32"
) -> dict[str, Any]:
  """Writes the export of `workdir`'s latest checkpoint into `out`; returns what
  D/tlm_jax.json records (the padding's cost for the llama format)."""
  if dtype not in DTYPES:
    raise ConfigError(f"--dtype={dtype!r} is unknown; use one of {tuple(DTYPES)}")
  config = workdir_lib.read_config(workdir)
  spec = config_lib.model_spec(config)
  check_exportable(spec, export_format)
  tokenizer = tokenizers.make_tokenizer(config.data)
  restored = restore.latest(workdir, jax.devices()[:1])
  widths = list(restored.model.widths)
  seq_len = restored.config.train.seq_len
  pad_to = max(widths) if export_format == "llama" else 0
  tensors = hf_tensors(restored.params, spec, widths, pad_to)
  os.makedirs(out, exist_ok=True)
  write_safetensors(
    os.path.join(out, WEIGHTS), {k: v.astype(DTYPES[dtype]) for k, v in tensors.items()}
  )
  _write_json(
    os.path.join(out, "config.json"),
    hf_config(spec, widths, export_format, dtype, seq_len, tokenizer.eos_id),
  )
  _write_json(
    os.path.join(out, "generation_config.json"),
    dict(
      bos_token_id=tokenizer.eos_id,
      eos_token_id=tokenizer.eos_id,
      pad_token_id=tokenizer.eos_id,
      do_sample=False,
    ),
  )
  if export_format == "tlm":
    for name in REMOTE_CODE:
      shutil.copyfile(os.path.join(REMOTE_CODE_DIR, name), os.path.join(out, name))
  write_tokenizer(out, config.data, tokenizer, seq_len)
  with open(os.path.join(out, CONFIG), "w") as f:
    f.write(restored.config.to_json_best_effort(indent=1, sort_keys=True))
  info = dict(
    workdir=os.path.abspath(workdir),
    step=restored.step,
    format=export_format,
    dtype=dtype,
    widths=widths,
  )
  if export_format == "llama":
    info["padding"] = padding_cost(spec, widths, seq_len)
  _write_json(os.path.join(out, INFO), info)
  return info


def load(export_dir: str) -> lm.Decoder:
  """An export read back into a tlm_jax decoder (unrolled, on the default device): the
  params are those exported (bit for bit at --dtype float32)."""
  path = os.path.join(export_dir, INFO)
  if not os.path.exists(path):
    raise ConfigError(f"{path} not found: {export_dir} was not written by tlm_jax.export_hf")
  with open(path) as f:
    widths = json.load(f)["widths"]
  config = config_lib.from_json(os.path.join(export_dir, CONFIG))
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: state.build_model(config)))
  tensors = read_safetensors(os.path.join(export_dir, WEIGHTS))
  params = params_from_hf(tensors, abstract, config_lib.model_spec(config), widths)
  return nnx.merge(graphdef, params)


def summary(out: str, info: dict[str, Any]) -> str:
  """What the command prints: where the export went, and the llama format's padding cost."""
  lines = [f"wrote {out} ({info['format']}, {info['dtype']}, step {info['step']})"]
  if "padding" in info:
    p = info["padding"]
    lines.append(
      f"llama format: every MLP padded to {p['padded_width']}: "
      f"{p['padded_params']:,} params ({p['params_overhead']:+.1%}), "
      f"{p['padded_flops_per_token']:,} training FLOPs per token ({p['flops_overhead']:+.1%})"
    )
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  del argv
  info = export(_WORKDIR.value, _OUT.value, _FORMAT.value, _DTYPE.value)
  print(summary(_OUT.value, info))


if __name__ == "__main__":
  _WORKDIR = flags.DEFINE_string("workdir", None, "A training run's folder.", required=True)
  _OUT = flags.DEFINE_string("out", None, "The folder to write the export into.", required=True)
  _FORMAT = flags.DEFINE_enum(
    "format",
    "tlm",
    FORMATS,
    "tlm: per-layer widths (remote code); "
    "llama: MLPs padded to the widest, stock LlamaForCausalLM.",
  )
  _DTYPE = flags.DEFINE_enum("dtype", "float32", tuple(DTYPES), "Dtype of the saved weights.")
  cli.run(main)
