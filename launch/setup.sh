#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned stack plus tlm_jax itself.
# `bash launch/setup.sh tpu|cuda` also installs jax[tpu] / jax[cuda13] at the
# pinned jax version; SETUP_DRY_RUN=1 prints the commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
case "${1:-}" in
  "") EXTRA="" ;;
  tpu) EXTRA=tpu ;;
  cuda) EXTRA=cuda13 ;;
  *) echo "usage: bash launch/setup.sh [tpu|cuda]" >&2; exit 2 ;;
esac
run() { if [ -n "${SETUP_DRY_RUN:-}" ]; then echo "$*"; else "$@"; fi; }
if [ ! -x .venv/bin/python ]; then
  # The pinned stack needs Python 3.11+; Cloud TPU images ship 3.10, so there we add 3.11.
  if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    if command -v python3.11 >/dev/null; then
      PYTHON=python3.11
    elif [ "$EXTRA" = tpu ] && command -v apt-get >/dev/null; then
      run sudo apt-get update -q
      run sudo apt-get install -y -q python3.11 python3.11-venv
      PYTHON=python3.11
    else
      echo "tlm_jax needs Python 3.11+ but $PYTHON is older: set PYTHON=/path/to/python3.11" >&2
      exit 1
    fi
  fi
  run "$PYTHON" -m venv .venv
fi
run .venv/bin/python -m pip install -q --upgrade pip
run .venv/bin/python -m pip install -q -r requirements.txt
if [ -n "$EXTRA" ]; then
  JAX_VERSION=$(sed -n 's/^jax==\([^ #]*\).*/\1/p' requirements.txt)
  [ -n "$JAX_VERSION" ] || { echo "no jax==VERSION pin in requirements.txt" >&2; exit 1; }
  run .venv/bin/python -m pip install -q "jax[$EXTRA]==$JAX_VERSION"
fi
run .venv/bin/python -m pip install -q --no-deps -e .
# The [eval] extra (pyproject.toml): lm-evaluation-harness for tlm_jax.lm_eval_adapter and its test.
run .venv/bin/python -m pip install -q "lm-eval==0.4.13"
# The [hf] extra: torch (CPU wheel), transformers, safetensors, accelerate for tlm_jax.export_hf.
run .venv/bin/python -m pip install -q "torch==2.13.0" "transformers==5.18.0" "safetensors==0.8.0" "accelerate==1.15.0"
# The [wandb] extra: Weights & Biases logging (train.wandb.project) and its test.
run .venv/bin/python -m pip install -q "wandb==0.31.0"
