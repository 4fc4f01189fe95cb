"""Flax NNX decoder models with per-layer MLP widths, built from a `ModelSpec` and widths.

Shape suffixes, one key everywhere: a tensor's name ends with its axes, e.g.
`x_BTD`, `q_BTNH`, `w_DF`.

    B batch          T query time      S key time       D model width
    F MLP width      N query heads     K kv heads       H head dim
    V vocab          L layers          C chunk (tokens) W conv taps
"""
