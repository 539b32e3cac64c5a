#!/usr/bin/env bash
# Submits training as a Vertex AI custom job (one chief pool, optional worker pool).
#
# Usage: scripts/submit_vertex.sh --project P --region R --image IMAGE --data-dir GS
#            --output-dir GS [--workers N] [--machine-type T] [--accelerator-type A]
#            [--accelerator-count N] [--name NAME] [--dry-run] [-- TRAINER_FLAGS...]
#   --output-dir   base output directory: Vertex sets AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and
#                  AIP_TENSORBOARD_LOG_DIR under it, which the trainer's flags default to
#   --workers      replicas of workerpool1 besides the chief (default 0: one machine)
#   --dry-run      print the job spec and the gcloud command instead of running them
# Trainer flags after `--` are passed to every replica (e.g. -- --model=seed_mlp --epochs=5).
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
project="" region="" image="" data_dir="" output_dir="" workers=0 dry_run=0
machine="n1-standard-8" accelerator="NVIDIA_TESLA_T4" accelerators=1 name="neumf-train"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project="${2:?}"; shift 2 ;;
    --region) region="${2:?}"; shift 2 ;;
    --image) image="${2:?}"; shift 2 ;;
    --data-dir) data_dir="${2:?}"; shift 2 ;;
    --output-dir) output_dir="${2:?}"; shift 2 ;;
    --workers) workers="${2:?}"; shift 2 ;;
    --machine-type) machine="${2:?}"; shift 2 ;;
    --accelerator-type) accelerator="${2:?}"; shift 2 ;;
    --accelerator-count) accelerators="${2:?}"; shift 2 ;;
    --name) name="${2:?}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "submit_vertex.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
for required in project region image data_dir output_dir; do
  [[ -n "${!required}" ]] || { echo "submit_vertex.sh: --${required//_/-} is required" >&2; exit 2; }
done
[[ "$workers" =~ ^[0-9]+$ ]] || { echo "submit_vertex.sh: --workers must be a count, got '${workers}'" >&2; exit 2; }
[[ "$image" == *:* && "$image" != *:latest ]] || { echo "submit_vertex.sh: --image needs an explicit tag other than latest, got '${image}'" >&2; exit 2; }
[[ "$output_dir" == gs://* && "$data_dir" == gs://* ]] || { echo "submit_vertex.sh: --data-dir and --output-dir must be gs:// paths" >&2; exit 2; }

args=("--data_dir=${data_dir}" "$@")
pool() {  # one worker pool spec in YAML; $1 = replica count
  cat <<YAML
  - replicaCount: $1
    machineSpec:
      machineType: ${machine}
      acceleratorType: ${accelerator}
      acceleratorCount: ${accelerators}
    containerSpec:
      imageUri: ${image}
      args:
YAML
  for a in "${args[@]}"; do printf '        - "%s"\n' "${a//\"/\\\"}"; done
}
spec="$(mktemp)"
trap 'rm -f "$spec"' EXIT
{
  echo "baseOutputDirectory:"
  echo "  outputUriPrefix: ${output_dir}"
  echo "workerPoolSpecs:"
  pool 1
  if (( workers > 0 )); then pool "$workers"; fi
} > "$spec"
cmd=(gcloud ai custom-jobs create "--project=${project}" "--region=${region}"
     "--display-name=${name}" "--config=${spec}")
if [[ $dry_run == 1 ]]; then
  cat "$spec"
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
