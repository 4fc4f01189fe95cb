#!/usr/bin/env bash
# The README's first command: set up, then train the demo (a small cosine-
# tapered Transformer on the built-in offline corpus), then evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
# libtpu (installed for TPU compile checks) probes for TPUs and complains on
# machines without one: run on the CPU there unless told otherwise.
if [ -z "${JAX_PLATFORMS:-}" ] && ! ls /dev/accel* /dev/vfio/[0-9]* >/dev/null 2>&1 \
    && ! command -v nvidia-smi >/dev/null; then
  export JAX_PLATFORMS=cpu
fi
WORKDIR=${WORKDIR:-workdirs/demo}
.venv/bin/python -m tlm_jax.taper --config configs/demo.py
.venv/bin/python -m tlm_jax.train --config configs/demo.py --workdir "$WORKDIR" "$@"
.venv/bin/python -m tlm_jax.evaluate --workdir "$WORKDIR"
echo "results in $WORKDIR: metrics.jsonl, eval_validation_*.json, checkpoints/, tensorboard/"
