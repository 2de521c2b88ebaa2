#!/usr/bin/env bash
# circuit-tracer's own virtual environment (it pins an older stack than scope_jax's):
#   tools/circuit_tracer/setup.sh [VENV]        (default .venv-circuit-tracer beside the repository)
# circuit-tracer 0.5.0 with its nnsight backend (its TransformerLens backend mis-sets Gemma 3's
# local/global rotary bases), transformers 4.57.3, huggingface_hub 0.36.2, nnsight 0.6.1,
# transformer-lens 3.2.1, on the CPU build of torch 2.13.0: every other package is held to the
# constraints below, so no CUDA build of torch is ever downloaded.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${1:-$here/../../.venv-circuit-tracer}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -c "$here/constraints.txt" -r "$here/requirements.txt"
python -c "import circuit_tracer, torch, transformers, nnsight; print('circuit-tracer', circuit_tracer.__version__, \
'torch', torch.__version__, 'transformers', transformers.__version__, 'nnsight', nnsight.__version__)"
touch "$venv/.scope_jax_built"  # a venv whose build stopped half-way lacks it and is built again
