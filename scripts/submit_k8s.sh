#!/usr/bin/env bash
# Submits training to Kubernetes: a single-node GPU Job or a multi-worker TFJob.
#
# Usage: scripts/submit_k8s.sh --kind job|tfjob --image IMAGE --data-dir GS --model-dir GS
#            [--workers N] [--ps M] [--gpus N] [--accelerator TYPE] [--name NAME]
#            [--set KEY=VALUE ...] [--namespace NS] [--dry-run]
#   --kind         job (k8s/job.yaml, one pod) or tfjob (k8s/tfjob.yaml, Kubeflow training-operator)
#   --workers      TFJob worker replicas (default 2)
#   --ps           tfjob only: M parameter-server replicas and a chief (k8s/tfjob_ps.yaml,
#                  ParameterServerStrategy, input from the tf.data service; PS_CPU, PS_MEMORY
#                  size them)
#   --data-workers with --ps: K data-only tf.data service pods (k8s/data_workers.yaml;
#                  DATA_WORKER_CPU, DATA_WORKER_MEMORY size them)
#   --set          any other value of the templates (MODEL, EPOCHS, BATCH_SIZE, CPU, MEMORY, ...)
#   --dry-run      print the rendered manifests instead of applying them
# The service account (k8s/serviceaccount.yaml) is applied too, GSA_EMAIL must be set for
# it; with a TFJob, the NetworkPolicy that admits only the job's own pods (k8s/networkpolicy.yaml).
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; }
kind="" dry_run=0 namespace="" ps=0 data_workers=0 sets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --kind) kind="${2:?--kind needs a value}"; shift 2 ;;
    --image) sets+=(--set "IMAGE=${2:?--image needs a value}"); shift 2 ;;
    --data-dir) sets+=(--set "DATA_DIR=${2:?--data-dir needs a value}"); shift 2 ;;
    --model-dir) sets+=(--set "MODEL_DIR=${2:?--model-dir needs a value}"); shift 2 ;;
    --workers) sets+=(--set "WORKERS=${2:?--workers needs a value}"); shift 2 ;;
    --ps) ps="${2:?--ps needs a value}"; sets+=(--set "PS=${ps}"); shift 2 ;;
    --data-workers) data_workers="${2:?--data-workers needs a value}"; sets+=(--set "DATA_WORKERS=${data_workers}"); shift 2 ;;
    --gpus) sets+=(--set "GPUS=${2:?--gpus needs a value}"); shift 2 ;;
    --accelerator) sets+=(--set "ACCELERATOR=${2:?--accelerator needs a value}"); shift 2 ;;
    --name) sets+=(--set "JOB_NAME=${2:?--name needs a value}"); shift 2 ;;
    --set) sets+=(--set "${2:?--set needs KEY=VALUE}"); shift 2 ;;
    --namespace) namespace="${2:?--namespace needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "submit_k8s.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$kind" in
  job|tfjob) ;;
  *) echo "submit_k8s.sh: --kind must be job or tfjob, got '${kind}'" >&2; exit 2 ;;
esac
[[ "$ps" =~ ^[0-9]+$ ]] || { echo "submit_k8s.sh: --ps must be a count, got '${ps}'" >&2; exit 2; }
template="$kind"
if (( ps > 0 )); then
  [[ "$kind" == tfjob ]] || { echo "submit_k8s.sh: --ps needs --kind tfjob" >&2; exit 2; }
  template=tfjob_ps
fi
here="$(cd "$(dirname "$0")/.." && pwd)"
render() { "${PYTHON:-python3}" "$here/scripts/render_manifest.py" "$@"; }
[[ "$data_workers" =~ ^[0-9]+$ ]] || { echo "submit_k8s.sh: --data-workers must be a count, got '${data_workers}'" >&2; exit 2; }
(( data_workers == 0 || ps > 0 )) || { echo "submit_k8s.sh: --data-workers needs --ps" >&2; exit 2; }
manifests="$(render "$here/k8s/serviceaccount.yaml" "${sets[@]}")"$'\n---\n'"$(render "$here/k8s/${template}.yaml" "${sets[@]}")"
if [[ "$kind" == tfjob ]]; then
  manifests+=$'\n---\n'"$(render "$here/k8s/networkpolicy.yaml" "${sets[@]}")"
fi
if (( data_workers > 0 )); then
  manifests+=$'\n---\n'"$(render "$here/k8s/data_workers.yaml" "${sets[@]}")"
fi
if [[ $dry_run == 1 ]]; then
  printf '%s\n' "$manifests"
else
  printf '%s\n' "$manifests" | kubectl apply ${namespace:+--namespace "$namespace"} -f -
fi
