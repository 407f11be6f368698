#!/usr/bin/env bash
# N flaxlm processes on this machine, joined over 127.0.0.1 through jax.distributed.
#
#   launch/local.sh [--dry-run] [--devices-per-process K] N flaxlm train CONFIG [key=value ...]
#
# Each process gets FLAXLM_COORDINATOR / FLAXLM_NUM_PROCESSES / FLAXLM_PROCESS_ID (and, on CPU,
# FLAXLM_LOCAL_DEVICES=K simulated devices). If one process fails, the others are stopped:
# a multi-host job never waits on a dead peer. Exit code: the first failing process's, or 0.
# DRY_RUN=1 is the same as --dry-run: print each process's command, run nothing.
set -euo pipefail

dry_run="${DRY_RUN:-0}"
devices=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --devices-per-process) devices="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]] || ! [[ "$1" =~ ^[0-9]+$ ]] || [[ "$1" -lt 1 ]]; then
  echo "usage: launch/local.sh [--dry-run] [--devices-per-process K] N COMMAND..." >&2
  exit 2
fi
n="$1"; shift

port="${FLAXLM_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
pids=()
set -m  # each process gets its own process group, so cleanup reaches its children too
cleanup() { for p in "${pids[@]:-}"; do kill -TERM -- "-$p" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for ((i = 0; i < n; i++)); do
  env_vars=(FLAXLM_COORDINATOR="127.0.0.1:${port}" FLAXLM_NUM_PROCESSES="$n" FLAXLM_PROCESS_ID="$i")
  [[ -n "$devices" ]] && env_vars+=(FLAXLM_LOCAL_DEVICES="$devices")
  if [[ "$dry_run" == 1 ]]; then
    echo "env ${env_vars[*]} $*"
    continue
  fi
  env -u XLA_FLAGS "${env_vars[@]}" "$@" &
  pids+=("$!")
done
[[ "$dry_run" == 1 ]] && exit 0

status=0
for ((k = 0; k < n; k++)); do
  # wait -n: return as soon as any process ends; a failure stops the rest.
  wait -n || status=$?
  if [[ "$status" != 0 ]]; then
    echo "launch/local.sh: a process failed (exit $status); stopping the others" >&2
    cleanup
    break
  fi
done
trap - EXIT
exit "$status"
