"""Flax NNX decoder models with per-layer MLP widths."""
