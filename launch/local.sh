#!/usr/bin/env bash
# Runs one command as N jax.distributed processes on this machine, each with D fake CPU devices:
#
#   launch/local.sh -n 2 -d 2 -- scope-jax run --config configs/local.py --workdir runs/local2
#
# Every process gets SCOPE_JAX_COORDINATOR / SCOPE_JAX_NUM_PROCESSES / SCOPE_JAX_PROCESS_ID and
# XLA_FLAGS=--xla_force_host_platform_device_count=D. Output lines are prefixed with the process
# index (and kept in LOGDIR/process_I.log with -l LOGDIR). When one process fails, the others get
# GRACE seconds to stop on their own (JAX's coordination service stops them) and are then killed;
# the script exits with the first failure's status. SIGINT/SIGTERM are passed on to every process
# (the trainer saves a checkpoint on SIGTERM).
set -euo pipefail

usage() {
  sed -n '2,11s/^# \{0,1\}//p' "$0"
  echo "options: -n PROCESSES (2)  -d DEVICES_PER_PROCESS (2)  -p PORT (a free one)  -l LOGDIR  -g GRACE_SECONDS (30)"
  exit "${1:-2}"
}

processes=2
devices=2
port=""
logdir=""
grace=30
while getopts "n:d:p:l:g:h" opt; do
  case "$opt" in
    n) processes="$OPTARG" ;;
    d) devices="$OPTARG" ;;
    p) port="$OPTARG" ;;
    l) logdir="$OPTARG" ;;
    g) grace="$OPTARG" ;;
    h) usage 0 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == "--" ]] && shift
(($# > 0)) || { echo "launch/local.sh: no command given" >&2; usage; }
for value in "$processes" "$devices" "$grace"; do
  [[ "$value" =~ ^[0-9]+$ ]] || { echo "launch/local.sh: '$value' is not a number" >&2; exit 2; }
done
if [[ -z "$port" ]]; then
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
[[ -n "$logdir" ]] && mkdir -p "$logdir"

pids=()
for ((i = 0; i < processes; i++)); do
  log="${logdir:+$logdir/process_$i.log}"
  (
    export SCOPE_JAX_COORDINATOR="127.0.0.1:$port" SCOPE_JAX_NUM_PROCESSES="$processes" SCOPE_JAX_PROCESS_ID="$i"
    other_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")"
    export XLA_FLAGS="$other_flags --xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu
    if [[ -n "$log" ]]; then
      exec "$@" > >(tee "$log" | sed -u "s/^/[$i] /") 2>&1
    else
      exec "$@" > >(sed -u "s/^/[$i] /") 2>&1
    fi
  ) &
  pids+=("$!")
done

trap 'kill -s TERM "${pids[@]}" 2>/dev/null || true' TERM
trap 'kill -s INT "${pids[@]}" 2>/dev/null || true' INT

status=0
killer=""
remaining=("${pids[@]}")
while ((${#remaining[@]} > 0)); do
  code=0
  finished=""
  wait -n -p finished "${remaining[@]}" || code=$?
  [[ -z "$finished" ]] && continue  # a trapped signal interrupted the wait
  for ((i = 0; i < ${#pids[@]}; i++)); do
    [[ "${pids[$i]}" == "$finished" ]] && index=$i
  done
  mapfile -t remaining < <(printf '%s\n' "${remaining[@]}" | grep -vx "$finished" || true)
  if ((code != 0 && status == 0)); then
    status=$code
    echo "launch/local.sh: process $index exited with status $code; the others have ${grace}s to stop" >&2
    (sleep "$grace" && kill -KILL "${remaining[@]}" 2>/dev/null) &
    killer=$!
  fi
done
if [[ -n "$killer" ]]; then kill "$killer" 2>/dev/null || true; fi
exit "$status"
