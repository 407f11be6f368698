#!/usr/bin/env bash
# N flaxlm pods on Kubernetes: an Indexed Job plus a headless Service for the coordinator.
#
#   launch/k8s/launch.sh [--dry-run] [--name flaxlm] [--namespace default] [--image IMAGE]
#       [--port 1234] [--resource nvidia.com/gpu=8 ...] [--pvc CLAIM] [--mount /runs] \
#       [--max-restarts 3] [--grace 300] N flaxlm train CONFIG [key=value ...]
#
# Pod i of Job NAME is host NAME-i in the Service NAME (Indexed Job hostnames + subdomain), so
# every pod reaches process 0 at NAME-0.NAME:PORT = FLAXLM_COORDINATOR. FLAXLM_NUM_PROCESSES
# is N and FLAXLM_PROCESS_ID is the pod's completion index (the annotation behind
# JOB_COMPLETION_INDEX). Restarts (the pod failure policy): a pod that fails (exit 75 from the
# hang watchdog or after a SIGTERM save, a dead peer) is replaced and resumes from the newest checkpoint (train.run_dir
# on the --pvc volume, shared by all, or a gs:// or s3:// bucket), up to --max-restarts times N pod failures; an evicted or
# preempted pod never counts; exit 3 (training diverged) fails the Job at once. A pod being
# stopped gets SIGTERM and --grace seconds to save before SIGKILL.
# DRY_RUN=1 is the same as --dry-run: print the kubectl command and manifest, apply nothing.
set -euo pipefail

dry_run="${DRY_RUN:-0}"
name="flaxlm"
namespace="default"
image="${IMAGE:-flaxlm:latest}"
port=1234
resources=()
pvc=""
mount="/runs"
max_restarts=3
grace=300
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --name) name="$2"; shift 2 ;;
    --namespace) namespace="$2"; shift 2 ;;
    --image) image="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --resource) resources+=("$2"); shift 2 ;;
    --pvc) pvc="$2"; shift 2 ;;
    --mount) mount="$2"; shift 2 ;;
    --max-restarts) max_restarts="$2"; shift 2 ;;
    --grace) grace="$2"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 2 ]] || ! [[ "$1" =~ ^[0-9]+$ ]] || [[ "$1" -lt 1 ]]; then
  echo "usage: launch/k8s/launch.sh [--dry-run] [options] N COMMAND..." >&2
  exit 2
fi
if ! [[ "$name" =~ ^[a-z]([-a-z0-9]{0,40}[a-z0-9])?$ ]]; then
  echo "launch/k8s/launch.sh: --name '$name' should be a DNS label: lower-case letters," \
    "digits and '-', at most 42 characters (pod hostnames are NAME-INDEX)" >&2
  exit 2
fi
if ! [[ "$namespace" =~ ^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$ ]]; then
  echo "launch/k8s/launch.sh: --namespace '$namespace' should be a DNS label" >&2
  exit 2
fi
for option in "port=$port" "max-restarts=$max_restarts" "grace=$grace"; do
  if ! [[ "${option#*=}" =~ ^[0-9]+$ ]]; then
    echo "launch/k8s/launch.sh: --${option%%=*} '${option#*=}' should be a number" >&2
    exit 2
  fi
done
n="$1"; shift

# A YAML double-quoted scalar: any argument (brackets, colons, quotes) stays one string.
quote() {
  local s="$1"
  s="${s//\\/\\\\}"; s="${s//\"/\\\"}"; s="${s//$'\n'/\\n}"; s="${s//$'\t'/\\t}"
  printf '"%s"' "$s"
}
command_yaml=""
for arg in "$@"; do command_yaml+="${command_yaml:+, }$(quote "$arg")"; done

limits=""
for r in "${resources[@]:-}"; do
  [[ -z "$r" ]] && continue
  if [[ "$r" != *=* ]]; then
    echo "launch/k8s/launch.sh: --resource '$r' should be NAME=COUNT, e.g. nvidia.com/gpu=8" >&2
    exit 2
  fi
  limits+=$'\n'"              ${r%%=*}: $(quote "${r#*=}")"
done
[[ -n "$limits" ]] && limits=$'\n'"          resources:"$'\n'"            limits:${limits}"

mounts=""
volumes=""
if [[ -n "$pvc" ]]; then
  mounts=$'\n'"          volumeMounts:"$'\n'"            - {name: runs, mountPath: $(quote "$mount")}"
  volumes=$'\n'"      volumes:"$'\n'"        - {name: runs, persistentVolumeClaim: {claimName: $(quote "$pvc")}}"
fi

manifest="apiVersion: v1
kind: Service
metadata:
  name: ${name}
  namespace: ${namespace}
spec:
  clusterIP: None  # headless: DNS names for the pods, no load balancing
  publishNotReadyAddresses: true  # process 0 must resolve before any pod is ready
  selector:
    flaxlm/job: ${name}
  ports:
    - {name: coordinator, port: ${port}}
---
apiVersion: batch/v1
kind: Job
metadata:
  name: ${name}
  namespace: ${namespace}
spec:
  completionMode: Indexed
  completions: ${n}
  parallelism: ${n}
  # A failure of the whole group is N pod failures: each pod's watchdog exits 75 (or its
  # runtime sees the dead peer); their replacements join again and resume.
  backoffLimit: $((max_restarts * n))
  podFailurePolicy:
    rules:
      - action: Ignore  # evicted, preempted, node drained: not the run's fault
        onPodConditions:
          - type: DisruptionTarget
      - action: FailJob  # training diverged: a restart would diverge again
        onExitCodes:
          containerName: flaxlm
          operator: In
          values: [3]
      # Any other failure (75 from the watchdog or a SIGTERM save) counts toward backoffLimit.
  template:
    metadata:
      labels:
        flaxlm/job: ${name}
    spec:
      subdomain: ${name}
      restartPolicy: Never  # the Job replaces a failed pod (required by podFailurePolicy)
      terminationGracePeriodSeconds: ${grace}  # SIGTERM, then this long to save
      containers:
        - name: flaxlm
          image: $(quote "$image")
          command: [${command_yaml}]
          ports:
            - {name: coordinator, containerPort: ${port}}
          env:
            - {name: FLAXLM_COORDINATOR, value: \"${name}-0.${name}:${port}\"}
            - {name: FLAXLM_NUM_PROCESSES, value: \"${n}\"}
            - name: FLAXLM_PROCESS_ID
              valueFrom:
                fieldRef:
                  fieldPath: metadata.annotations['batch.kubernetes.io/job-completion-index']${limits}${mounts}${volumes}"

if [[ "$dry_run" == 1 ]]; then
  printf "kubectl apply -f - <<'EOF'\n%s\nEOF\n" "$manifest"
  exit 0
fi
printf '%s\n' "$manifest" | kubectl apply -f -
