"""The config of a tlm_jax decoder exported to Hugging Face transformers (5.x).

Llama's fields, except that `intermediate_size` is a list: the MLP width of each layer
(a tapered model's widths differ). `attention_gate` ("headwise" | "elementwise" | None)
adds Gated Attention's sigmoid output gate, with a bias when `attention_gate_bias`.
Written by tlm_jax/export_hf.py; imports no tlm_jax, so the export loads anywhere.
"""

from transformers import PreTrainedConfig


class TlmConfig(PreTrainedConfig):
  model_type = "tlm"
  keys_to_ignore_at_inference = ["past_key_values"]

  def __init__(
    self,
    vocab_size: int = 256,
    hidden_size: int = 64,
    intermediate_size: list[int] | None = None,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 4,
    head_dim: int = 16,
    rms_norm_eps: float = 1e-6,
    rope_parameters: dict | None = None,
    max_position_embeddings: int = 2048,
    attention_gate: str | None = None,
    attention_gate_bias: bool = False,
    tie_word_embeddings: bool = False,
    initializer_range: float = 0.02,
    use_cache: bool = True,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    **kwargs,
  ):
    self.vocab_size = vocab_size
    self.hidden_size = hidden_size
    self.intermediate_size = list(intermediate_size or [4 * hidden_size] * num_hidden_layers)
    if len(self.intermediate_size) != num_hidden_layers:
      raise ValueError(
        f"intermediate_size has {len(self.intermediate_size)} widths for "
        f"num_hidden_layers={num_hidden_layers}: give one per layer"
      )
    if attention_gate not in (None, "headwise", "elementwise"):
      raise ValueError(f"attention_gate={attention_gate!r}: use null, headwise or elementwise")
    self.num_hidden_layers = num_hidden_layers
    self.num_attention_heads = num_attention_heads
    self.num_key_value_heads = num_key_value_heads
    self.head_dim = head_dim
    self.rms_norm_eps = rms_norm_eps
    self.rope_parameters = rope_parameters or {"rope_type": "default", "rope_theta": 10_000.0}
    self.max_position_embeddings = max_position_embeddings
    self.attention_gate = attention_gate
    self.attention_gate_bias = attention_gate_bias
    self.hidden_act = "silu"
    self.initializer_range = initializer_range
    self.use_cache = use_cache
    self.tie_word_embeddings = tie_word_embeddings
    self.bos_token_id = bos_token_id
    self.eos_token_id = eos_token_id
    self.pad_token_id = pad_token_id
    super().__init__(**kwargs)
