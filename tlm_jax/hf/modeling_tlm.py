"""A tlm_jax decoder in PyTorch for Hugging Face transformers (5.x): Llama's layout with a
per-layer MLP width and an optional sigmoid output gate on attention (Gated Attention).

What it computes is tlm_jax/model/lm.py's Decoder: pre-norm blocks x + attn(norm(x)), then
x + SwiGLU_l(norm(x)) at layer l's own width; RMSNorm in float32; RoPE rotating the two
halves of each head (theta ** (-i / half)); grouped-query heads (query head n reads kv head
n // group); no embedding scaling, no logit soft-capping; a final norm and a head, tied to
the embedding or not. Attention runs through transformers' attention registry
(`config._attn_implementation`: sdpa, eager, flash, flex, or a serving backend's), keys and
values through its Cache. Written by tlm_jax/export_hf.py; imports no tlm_jax.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .configuration_tlm import TlmConfig


class TlmRMSNorm(nn.Module):
  """x / rms(x) * weight, in float32, returned in the input dtype."""

  def __init__(self, dim: int, eps: float):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))
    self.eps = eps

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
    return (h * self.weight.float()).to(x.dtype)


def rope_cos_sin(
  positions_BT: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
  """cos and sin (B, T, head_dim / 2) of each position's angles, computed in float32."""
  half = head_dim // 2
  freq = theta ** (-torch.arange(half, dtype=torch.float32, device=positions_BT.device) / half)
  angle = positions_BT.float()[..., None] * freq
  return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x_BNTH: torch.Tensor, cos_BTH: torch.Tensor, sin_BTH: torch.Tensor) -> torch.Tensor:
  """Rotates (x1, x2), the two halves of each head, by the angles: (x1 cos - x2 sin,
  x2 cos + x1 sin), in float32."""
  half = x_BNTH.shape[-1] // 2
  cos, sin = cos_BTH[:, None].float(), sin_BTH[:, None].float()
  x = x_BNTH.float()
  x1, x2 = x[..., :half], x[..., half:]
  return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BNTH.dtype)


def eager_attention(
  module: nn.Module,
  query: torch.Tensor,
  key: torch.Tensor,
  value: torch.Tensor,
  attention_mask: torch.Tensor | None,
  scaling: float,
  dropout: float = 0.0,
  **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
  """softmax(q k^T * scaling + mask) v with kv heads shared by their query-head group;
  (B, T, N, H) out, as every function of the registry returns."""
  group = query.shape[1] // key.shape[1]
  key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
  scores = torch.matmul(query, key.transpose(2, 3)) * scaling
  if attention_mask is not None:
    scores = scores + attention_mask[:, :, :, : key.shape[-2]]
  weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
  weights = nn.functional.dropout(weights, p=dropout, training=module.training)
  return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class TlmAttention(nn.Module):
  """Causal attention with RoPE and grouped-query heads; with `config.attention_gate`, the
  heads' outputs are multiplied by sigmoid(gate_proj(x)) (one gate per head or per channel)
  before o_proj."""

  def __init__(self, config: TlmConfig, layer_idx: int):
    super().__init__()
    self.config = config
    self.layer_idx = layer_idx
    d, n, k, h = (
      config.hidden_size,
      config.num_attention_heads,
      config.num_key_value_heads,
      config.head_dim,
    )
    self.head_dim = h
    self.num_key_value_groups = n // k
    self.scaling = h**-0.5
    self.is_causal = True
    self.attention_dropout = 0.0
    self.q_proj = nn.Linear(d, n * h, bias=False)
    self.k_proj = nn.Linear(d, k * h, bias=False)
    self.v_proj = nn.Linear(d, k * h, bias=False)
    self.o_proj = nn.Linear(n * h, d, bias=False)
    self.gate = config.attention_gate
    if self.gate:
      gates = n * h if self.gate == "elementwise" else n
      self.gate_proj = nn.Linear(d, gates, bias=config.attention_gate_bias)

  def forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    past_key_values: Cache | None = None,
    **kwargs,
  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    batch, length = hidden_states.shape[:2]
    shape = (batch, length, -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if past_key_values is not None:
      k, v = past_key_values.update(k, v, self.layer_idx)
    attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
      self.config._attn_implementation, eager_attention
    )
    y_BTNH, weights = attend(
      self, q, k, v, attention_mask, dropout=0.0, scaling=self.scaling, **kwargs
    )
    y_BTNH = y_BTNH.reshape(batch, length, -1, self.head_dim)
    if self.gate:
      gate = torch.sigmoid(self.gate_proj(hidden_states))
      y_BTNH = y_BTNH * gate.view(
        batch, length, -1, self.head_dim if self.gate == "elementwise" else 1
      )
    return self.o_proj(y_BTNH.reshape(batch, length, -1)), weights


class TlmMLP(nn.Module):
  """SwiGLU at this layer's own width: down(silu(gate(x)) * up(x))."""

  def __init__(self, hidden_size: int, width: int):
    super().__init__()
    self.gate_proj = nn.Linear(hidden_size, width, bias=False)
    self.up_proj = nn.Linear(hidden_size, width, bias=False)
    self.down_proj = nn.Linear(width, hidden_size, bias=False)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TlmDecoderLayer(nn.Module):
  def __init__(self, config: TlmConfig, layer_idx: int):
    super().__init__()
    self.input_layernorm = TlmRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.self_attn = TlmAttention(config, layer_idx)
    self.post_attention_layernorm = TlmRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.mlp = TlmMLP(config.hidden_size, config.intermediate_size[layer_idx])

  def forward(
    self,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    past_key_values: Cache | None = None,
    **kwargs,
  ) -> torch.Tensor:
    y, _ = self.self_attn(
      self.input_layernorm(hidden_states),
      position_embeddings,
      attention_mask=attention_mask,
      past_key_values=past_key_values,
      **kwargs,
    )
    hidden_states = hidden_states + y
    return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class TlmPreTrainedModel(PreTrainedModel):
  config_class = TlmConfig
  base_model_prefix = "model"
  supports_gradient_checkpointing = False
  _no_split_modules = ["TlmDecoderLayer"]
  _skip_keys_device_placement = ["past_key_values"]
  _supports_sdpa = True
  _supports_flash_attn = True
  _supports_flex_attn = True
  _supports_attention_backend = True
  _can_compile_fullgraph = True

  def _init_weights(self, module: nn.Module) -> None:
    """Normal(0, initializer_range) weights, zero biases, unit norms: only for weights an
    export does not hold (it holds them all)."""
    std = self.config.initializer_range
    if isinstance(module, (nn.Linear, nn.Embedding)):
      nn.init.normal_(module.weight, std=std)
      if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, TlmRMSNorm):
      nn.init.ones_(module.weight)


class TlmModel(TlmPreTrainedModel):
  """Embedding, the blocks, the final norm: hidden states for the head."""

  def __init__(self, config: TlmConfig):
    super().__init__(config)
    self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
    self.layers = nn.ModuleList(
      [TlmDecoderLayer(config, l) for l in range(config.num_hidden_layers)]
    )
    self.norm = TlmRMSNorm(config.hidden_size, config.rms_norm_eps)
    self.post_init()

  def get_input_embeddings(self) -> nn.Embedding:
    return self.embed_tokens

  def set_input_embeddings(self, value: nn.Embedding) -> None:
    self.embed_tokens = value

  def forward(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Cache | None = None,
    inputs_embeds: torch.FloatTensor | None = None,
    use_cache: bool | None = None,
    **kwargs,
  ) -> BaseModelOutputWithPast:
    if (input_ids is None) == (inputs_embeds is None):
      raise ValueError("give exactly one of input_ids and inputs_embeds")
    if inputs_embeds is None:
      inputs_embeds = self.embed_tokens(input_ids)
    use_cache = self.config.use_cache if use_cache is None else use_cache
    if use_cache and past_key_values is None:
      past_key_values = DynamicCache(config=self.config)
    if position_ids is None:
      seen = past_key_values.get_seq_length() if past_key_values is not None else 0
      position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + seen
      position_ids = position_ids.unsqueeze(0)
    mask = create_causal_mask(
      config=self.config,
      inputs_embeds=inputs_embeds,
      attention_mask=attention_mask,
      past_key_values=past_key_values,
      position_ids=position_ids,
    )
    positions = position_ids.expand(inputs_embeds.shape[0], -1)
    theta = self.config.rope_parameters["rope_theta"]
    rope = rope_cos_sin(positions, self.config.head_dim, theta, inputs_embeds.dtype)
    hidden_states = inputs_embeds
    for layer in self.layers:
      hidden_states = layer(
        hidden_states,
        rope,
        attention_mask=mask,
        past_key_values=past_key_values,
        position_ids=position_ids,
        **kwargs,
      )
    return BaseModelOutputWithPast(
      last_hidden_state=self.norm(hidden_states),
      past_key_values=past_key_values if use_cache else None,
    )


class TlmForCausalLM(TlmPreTrainedModel, GenerationMixin):
  _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

  def __init__(self, config: TlmConfig):
    super().__init__(config)
    self.model = TlmModel(config)
    self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    self.post_init()

  def get_input_embeddings(self) -> nn.Embedding:
    return self.model.embed_tokens

  def set_input_embeddings(self, value: nn.Embedding) -> None:
    self.model.embed_tokens = value

  def get_output_embeddings(self) -> nn.Linear:
    return self.lm_head

  def set_output_embeddings(self, value: nn.Linear) -> None:
    self.lm_head = value

  def forward(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Cache | None = None,
    inputs_embeds: torch.FloatTensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: int | torch.Tensor = 0,
    **kwargs,
  ) -> CausalLMOutputWithPast:
    out = self.model(
      input_ids=input_ids,
      attention_mask=attention_mask,
      position_ids=position_ids,
      past_key_values=past_key_values,
      inputs_embeds=inputs_embeds,
      use_cache=use_cache,
      **kwargs,
    )
    keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
    logits = self.lm_head(out.last_hidden_state[:, keep, :]).float()
    loss = None
    if labels is not None:
      loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
    return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)
