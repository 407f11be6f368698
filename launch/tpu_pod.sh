#!/usr/bin/env bash
# The same flaxlm command on every worker of a Cloud TPU VM pod, over gcloud ssh.
#
#   launch/tpu_pod.sh [--dry-run] [--zone Z] [--project P] [--workdir DIR] TPU_NAME \
#       flaxlm train CONFIG [key=value ...]
#
# Each worker runs `cd DIR && FLAXLM_DISTRIBUTED_AUTO=1 COMMAND` (DIR default: ~/flaxlm, where
# the repo and its venv must already be on every worker): on TPU, jax.distributed.initialize()
# finds the coordinator, the process count and this worker's id from the TPU metadata, so
# nothing is passed by hand. gcloud returns when every worker's command has ended; a worker
# that dies leaves the others to the heartbeat timeout or the hang watchdog (exit 75).
# DRY_RUN=1 is the same as --dry-run: print the gcloud command, run nothing.
set -euo pipefail

dry_run="${DRY_RUN:-0}"
zone="${ZONE:-}"
project="${PROJECT:-}"
workdir="~/flaxlm"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]]; then
  echo "usage: launch/tpu_pod.sh [--dry-run] [--zone Z] [--project P] [--workdir DIR]" \
    "TPU_NAME COMMAND..." >&2
  exit 2
fi
name="$1"; shift

# The remote shell gets one string: quote each word so overrides like data.paths=[a,b] survive.
# The workdir stays unquoted so a leading ~ expands on the worker.
remote="cd ${workdir} && FLAXLM_DISTRIBUTED_AUTO=1 $(printf '%q ' "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$name" --worker=all)
[[ -n "$zone" ]] && cmd+=(--zone="$zone")
[[ -n "$project" ]] && cmd+=(--project="$project")
cmd+=(--command="${remote% }")

# Prints a command as a shell would read it back: plain words bare, the rest in single quotes.
show() {
  local out=() w q="'"
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$w"); else out+=("'${w//$q/$q\\$q$q}'"); fi
  done
  echo "${out[*]}"
}

if [[ "$dry_run" == 1 ]]; then
  show "${cmd[@]}"
  exit 0
fi
exec "${cmd[@]}"
