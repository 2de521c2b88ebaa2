#!/usr/bin/env bash
# Cloud TPU slices: create one, install scope_jax on every worker, run a command on all workers
# at once (each worker is one jax.distributed process; SCOPE_JAX_DISTRIBUTED=auto finds the
# others), stream and keep the logs, delete the slice.
#
#   launch/tpu.sh create  NAME
#   launch/tpu.sh install NAME
#   launch/tpu.sh run     NAME -- scope-jax sweep --config configs/gemma2.py:size=2b --workdir ...
#   launch/tpu.sh delete  NAME
#   launch/tpu.sh all     NAME -- COMMAND...   (create, install, run, then delete even on failure)
#
# Settings (environment): ZONE (us-central2-b), ACCELERATOR_TYPE (v4-32), RUNTIME_VERSION
# (tpu-ubuntu2204-base), PROJECT (gcloud's default), SPOT=1 for spot capacity, LOGDIR (logs),
# EXTRA_PIP (more pip requirements, e.g. a model package), DRY_RUN=1 to print the gcloud
# commands instead of running them.
set -euo pipefail

ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
LOGDIR="${LOGDIR:-logs}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  sed -n '2,15s/^# \{0,1\}//p' "$0"
  exit "${1:-2}"
}

gcloud_tpu() {
  local args=(gcloud compute tpus tpu-vm "$@" --zone "$ZONE")
  [[ -n "${PROJECT:-}" ]] && args+=(--project "$PROJECT")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local quoted
    printf -v quoted '%q ' "${args[@]}"
    echo "${quoted% }"
  else
    "${args[@]}"
  fi
}

create() {
  local spot=()
  [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
  gcloud_tpu create "$1" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION" "${spot[@]}"
}

install() {
  # The same wheel and configs on every worker, plus JAX's TPU runtime at the local JAX's version.
  local wheel_dir jax_version
  wheel_dir="$(mktemp -d)"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    touch "$wheel_dir/scope_jax-0-py3-none-any.whl"
  else
    python3 -m pip wheel --quiet --no-deps --wheel-dir "$wheel_dir" "$REPO"
  fi
  jax_version="$(python3 -c 'import jax; print(jax.__version__)' 2>/dev/null || echo "")"
  gcloud_tpu scp "$wheel_dir"/scope_jax-*.whl "$1:~/" --worker=all
  gcloud_tpu scp --recurse "$REPO/configs" "$1:~/" --worker=all  # `--config configs/...` runs from ~
  gcloud_tpu ssh "$1" --worker=all --command \
    "python3 -m pip install --quiet --upgrade pip && python3 -m pip install --quiet ~/scope_jax-*.whl 'jax[tpu]${jax_version:+==$jax_version}' ${EXTRA_PIP:-}"
  rm -rf "$wheel_dir"
}

run() {
  local name="$1"
  shift
  (($# > 0)) || { echo "launch/tpu.sh run: no command given" >&2; usage; }
  local command log
  command="$(printf '%q ' "$@")"
  mkdir -p "$LOGDIR"
  log="$LOGDIR/$name-$(date +%Y%m%d-%H%M%S).log"
  echo "launch/tpu.sh: running on every worker of $name; log in $log" >&2
  # Every worker's output arrives here, prefixed by gcloud with the worker's address.
  gcloud_tpu ssh "$name" --worker=all --command "export SCOPE_JAX_DISTRIBUTED=auto PATH=\$HOME/.local/bin:\$PATH; $command" \
    2>&1 | tee "$log"
  return "${PIPESTATUS[0]}"
}

delete() {
  gcloud_tpu delete "$1" --quiet
}

(($# >= 2)) || usage
action="$1"
name="$2"
shift 2
[[ "${1:-}" == "--" ]] && shift
case "$action" in
  create) create "$name" ;;
  install) install "$name" ;;
  run) run "$name" "$@" ;;
  delete) delete "$name" ;;
  all)
    trap 'delete "$name"' EXIT
    create "$name"
    install "$name"
    run "$name" "$@"
    ;;
  *) usage ;;
esac
