"""Look inside trained models: one module per analysis, each a function and a CLI.

    python -m tlm_jax.analysis.{alignment,swap_kl,looping,hyperfit} --workdir W

Each restores W's latest checkpoint (`tlm_jax.restore`), runs on every backbone through
the per-sublayer runner (`blocks`), and writes W/analysis_NAME.json and
W/analysis_NAME.png. `lora` holds the Late-Stage LoRA adapters hyperfit
trains.
"""
