#!/usr/bin/env bash
# The README's first command: set up, then run the main job on the built-in model.
# Until the trainer lands (issue: training system) the main job is the taper's
# per-layer budget table and a forward pass of the tiny tapered decoder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
CONFIG=${CONFIG:-configs/tlm_transformer.py:tiny}
.venv/bin/python -m tlm_jax.taper --config "$CONFIG"
.venv/bin/python -m tlm_jax.model --config "$CONFIG"
