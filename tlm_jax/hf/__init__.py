"""The Hugging Face remote code that `python -m tlm_jax.export_hf` copies into an export.

These files import torch and transformers only, never tlm_jax: they run wherever the
export is loaded (`AutoModelForCausalLM.from_pretrained(D, trust_remote_code=True)`).
"""
