#!/usr/bin/env bash
# Attribution graphs of the embedded Gemma 3 270M with circuit-tracer, from scope_jax's files:
#   tools/circuit_tracer/graphs.sh DICTIONARY OUT "prompt" ["prompt" ...] [-- attribute.py options]
# DICTIONARY: a CLT (runs/NAME/export/circuit-tracer/CLT) or a transcoder set (`scope-jax
# transcoder-set`). Run from scope_jax's environment (its python writes the tokenizer). The first
# run builds circuit-tracer's environment (setup.sh; $CIRCUIT_TRACER_VENV, default
# .venv-circuit-tracer) and the model's Hugging Face directory ($CIRCUIT_TRACER_MODEL, default
# ~/.cache/scope_jax/gemma-3-270m-hf). Each graph is OUT/graph_N.pt, summarized in OUT/graphs.jsonl.
set -euo pipefail
if [ $# -lt 3 ]; then sed -n 2,8p "$0"; exit 2; fi
here="$(cd "$(dirname "$0")" && pwd)"
venv="${CIRCUIT_TRACER_VENV:-$here/../../.venv-circuit-tracer}"
model="${CIRCUIT_TRACER_MODEL:-${XDG_CACHE_HOME:-$HOME/.cache}/scope_jax/gemma-3-270m-hf}"
dictionary="$1" out="$2"
shift 2
[ -f "$venv/.scope_jax_built" ] || "$here/setup.sh" "$venv"
if [ ! -f "$model/model.safetensors" ] || [ ! -f "$model/tokenizer.json" ]; then
  gguf="$(python -c "from scope_jax.models.embedded import embedded_gguf_path; print(embedded_gguf_path('gemma3-270m'))")"
  "$venv/bin/python" "$here/hf_model.py" model "$gguf" "$model"
  python "$here/hf_model.py" tokenizer "$gguf" "$model"
fi
exec "$venv/bin/python" "$here/attribute.py" --model "$model" --dictionary "$dictionary" --out "$out" "$@"
