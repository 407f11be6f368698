#!/usr/bin/env bash
# The same flaxlm command on every worker of a Cloud TPU VM pod, over gcloud ssh.
#
#   launch/tpu_pod.sh [--dry-run] [--zone Z] [--project P] [--workdir DIR] [--id ID] \
#       [--poll SECONDS] TPU_NAME flaxlm train CONFIG [key=value ...]
#   launch/tpu_pod.sh [--zone Z] [--project P] --attach ID TPU_NAME   # follow it again
#   launch/tpu_pod.sh [--zone Z] [--project P] --stop ID TPU_NAME     # SIGTERM: save and exit
#
# Each worker runs `cd DIR && FLAXLM_DISTRIBUTED_AUTO=1 COMMAND` (DIR default: ~/flaxlm, where
# the repo and its venv must already be on every worker): on TPU, jax.distributed.initialize()
# finds the coordinator, the process count and this worker's id from the TPU metadata, so
# nothing is passed by hand. The command runs detached (setsid nohup, output in
# ~/.flaxlm-launch/ID/log on each worker), so a dropped SSH connection, or this script dying,
# does not stop it. This script then polls every worker over ssh (every --poll s, default 30;
# a failed poll is retried, up to 20 in a row), prints worker 0's log as it grows, and exits
# with the first non-zero exit code of a worker, or 0. ID defaults to the launch time.
# DRY_RUN=1 is the same as --dry-run: print the gcloud commands, run nothing.
set -euo pipefail

dry_run="${DRY_RUN:-0}"
zone="${ZONE:-}"
project="${PROJECT:-}"
workdir="~/flaxlm"
id="${FLAXLM_LAUNCH_ID:-$(date -u +%Y%m%d-%H%M%S)}"
poll="${FLAXLM_POLL_S:-30}"
retries="${FLAXLM_SSH_RETRIES:-20}"
mode=start
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --id) id="$2"; shift 2 ;;
    --poll) poll="$2"; shift 2 ;;
    --attach) mode=attach; id="$2"; shift 2 ;;
    --stop) mode=stop; id="$2"; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]] || [[ "$mode" == start && $# -lt 2 ]]; then
  echo "usage: launch/tpu_pod.sh [--dry-run] [--zone Z] [--project P] [--workdir DIR]" \
    "[--id ID] [--poll S] TPU_NAME COMMAND...   (or --attach ID / --stop ID TPU_NAME)" >&2
  exit 2
fi
if ! [[ "$id" =~ ^[A-Za-z0-9._-]+$ ]]; then
  echo "launch/tpu_pod.sh: --id '$id' should be letters, digits, '.', '_' or '-'" >&2
  exit 2
fi
name="$1"; shift

ssh_cmd() {  # ssh_cmd WORKER REMOTE_COMMAND: the gcloud command line, as an array in $ssh
  ssh=(gcloud compute tpus tpu-vm ssh "$name" --worker="$1")
  [[ -n "$zone" ]] && ssh+=(--zone="$zone")
  [[ -n "$project" ]] && ssh+=(--project="$project")
  ssh+=(--command="$2")
}

# Everything a worker keeps for this launch; $HOME expands on the worker.
dir="\$HOME/.flaxlm-launch/${id}"
# The job: the command in the background of a detached shell, which records the command's pid
# (for --stop) and, when it ends, its exit code. Quoted twice: once for the inner bash -c, once
# for the remote shell; the workdir stays unquoted so a leading ~ expands on the worker.
job="FLAXLM_DISTRIBUTED_AUTO=1 $(printf '%q ' "$@")& echo \$! > \"${dir}/child\"; wait \$!;"
job+=" echo \$? > \"${dir}/exit_code\""
# mkdir is the once-only guard: starting again (a retried ssh) never starts a second job.
start="cd ${workdir} && mkdir -p \"\$HOME/.flaxlm-launch\" && if mkdir \"${dir}\"; then"
start+=" setsid nohup bash -c $(printf '%q' "$job") > \"${dir}/log\" 2>&1 < /dev/null &"
start+=" echo \$! > \"${dir}/pid\"; else echo 'flaxlm-worker: launch ${id} already started'; fi"
status="if [ -e \"${dir}/exit_code\" ]; then echo \"flaxlm-worker exit \$(cat \"${dir}/exit_code\")\";"
status+=" elif kill -0 \"\$(cat \"${dir}/pid\" 2>/dev/null)\" 2>/dev/null; then"
status+=" echo 'flaxlm-worker running'; else echo 'flaxlm-worker lost'; fi"
stop="kill -TERM \"\$(cat \"${dir}/child\")\""
log_from() { echo "tail -c +$1 \"${dir}/log\""; }  # worker 0's log from byte $1 on

# Prints a command as a shell would read it back: plain words bare, the rest in single quotes.
show() {
  local out=() w q="'"
  for w in "$@"; do
    if [[ "$w" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then out+=("$w"); else out+=("'${w//$q/$q\\$q$q}'"); fi
  done
  echo "${out[*]}"
}

if [[ "$dry_run" == 1 ]]; then
  case "$mode" in
    start) ssh_cmd all "$start"; show "${ssh[@]}" ;;
    stop) ssh_cmd all "$stop"; show "${ssh[@]}" ;;
  esac
  [[ "$mode" == stop ]] && exit 0
  ssh_cmd all "$status"; echo "$(show "${ssh[@]}")  # every ${poll}s until no worker runs"
  ssh_cmd 0 "$(log_from 1)"; echo "$(show "${ssh[@]}")  # worker 0's new output, each poll"
  exit 0
fi

if [[ "$mode" == stop ]]; then
  ssh_cmd all "$stop"; "${ssh[@]}"
  echo "launch/tpu_pod.sh: SIGTERM sent to launch ${id}; the workers save and exit" >&2
  exit 0
fi
if [[ "$mode" == start ]]; then
  ssh_cmd all "$start"
  for ((try = 1; ; try++)); do  # retrying is safe: a started worker is not started again
    "${ssh[@]}" && break
    if ((try >= retries)); then
      echo "launch/tpu_pod.sh: could not start launch ${id} on every worker" >&2
      exit 255
    fi
    sleep "$poll"
  done
fi
echo "launch/tpu_pod.sh: launch ${id} on ${name}; logs in ~/.flaxlm-launch/${id}/ on each" \
  "worker. Follow again: $0 --attach ${id} ${name}; stop (saves first): $0 --stop ${id} ${name}" >&2

offset=1 failures=0 out="$(mktemp)"
trap 'rm -f "$out"' EXIT
while :; do
  ssh_cmd all "$status"
  if workers="$("${ssh[@]}" 2>/dev/null)" && grep -q '^flaxlm-worker ' <<<"$workers"; then
    failures=0
  else
    workers=""
    failures=$((failures + 1))
    if ((failures >= retries)); then
      echo "launch/tpu_pod.sh: ${failures} polls in a row failed; the workers may still run." \
        "Follow again: $0 --attach ${id} ${name}" >&2
      exit 255
    fi
    echo "launch/tpu_pod.sh: poll failed (${failures} of ${retries}); retrying" >&2
  fi
  # After the status, so that the last poll prints the log to its end.
  ssh_cmd 0 "$(log_from "$offset")"
  if "${ssh[@]}" > "$out" 2>/dev/null; then
    cat "$out"
    offset=$((offset + $(wc -c < "$out")))
  fi
  if [[ -z "$workers" ]] || grep -q '^flaxlm-worker running' <<<"$workers"; then
    sleep "$poll"
    continue
  fi
  if grep -q '^flaxlm-worker lost' <<<"$workers"; then
    echo "launch/tpu_pod.sh: a worker's process ended without an exit code (rebooted?)" >&2
    exit 1
  fi
  for code in $(sed -n 's/^flaxlm-worker exit //p' <<<"$workers"); do
    [[ "$code" != 0 ]] && { echo "launch/tpu_pod.sh: a worker exited ${code}" >&2; exit "$code"; }
  done
  exit 0
done
