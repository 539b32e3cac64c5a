#!/usr/bin/env bash
# Submits training as a Vertex AI custom job (a chief pool, optional worker and ps pools).
#
# Usage: scripts/submit_vertex.sh --project P --region R --image IMAGE --data-dir GS
#            --output-dir GS [--workers N] [--ps M] [--machine-type T] [--accelerator-type A]
#            [--accelerator-count N] [--ps-machine-type T] [--name NAME] [--dry-run]
#            [-- TRAINER_FLAGS...]
#   --output-dir   base output directory: Vertex sets AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and
#                  AIP_TENSORBOARD_LOG_DIR under it, which the trainer's flags default to
#   --workers      replicas of workerpool1 besides the chief (default 0: one machine)
#   --ps           M parameter-server replicas in workerpool2 (Vertex's order: chief, workers,
#                  ps, evaluator), CPU machines of --ps-machine-type (default n1-highmem-16);
#                  the trainer then picks ParameterServerStrategy and needs --workers >= 1
#   --dry-run      print the job spec and the gcloud command instead of running them
# Trainer flags after `--` are passed to every replica (e.g. -- --model=seed_mlp --epochs=5).
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }
project="" region="" image="" data_dir="" output_dir="" workers=0 ps=0 dry_run=0
ps_machine="n1-highmem-16"
machine="n1-standard-8" accelerator="NVIDIA_TESLA_T4" accelerators=1 name="neumf-train"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project="${2:?}"; shift 2 ;;
    --region) region="${2:?}"; shift 2 ;;
    --image) image="${2:?}"; shift 2 ;;
    --data-dir) data_dir="${2:?}"; shift 2 ;;
    --output-dir) output_dir="${2:?}"; shift 2 ;;
    --workers) workers="${2:?}"; shift 2 ;;
    --ps) ps="${2:?}"; shift 2 ;;
    --ps-machine-type) ps_machine="${2:?}"; shift 2 ;;
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
[[ "$ps" =~ ^[0-9]+$ ]] || { echo "submit_vertex.sh: --ps must be a count, got '${ps}'" >&2; exit 2; }
(( ps == 0 || workers > 0 )) || { echo "submit_vertex.sh: --ps ${ps} needs --workers of at least 1 (the chief only coordinates)" >&2; exit 2; }
[[ "$image" == *:* && "$image" != *:latest ]] || { echo "submit_vertex.sh: --image needs an explicit tag other than latest, got '${image}'" >&2; exit 2; }
[[ "$output_dir" == gs://* && "$data_dir" == gs://* ]] || { echo "submit_vertex.sh: --data-dir and --output-dir must be gs:// paths" >&2; exit 2; }

args=("--data_dir=${data_dir}" "$@")
# A parameter-server cluster reads its input from the tf.data service (dispatcher on the
# chief, a data worker in each worker task).
if (( ps > 0 )); then args=("--data_dir=${data_dir}" --input_service "$@"); fi
pool() {  # one worker pool spec in YAML; $1 = replica count, $2 = cpu for a CPU-only pool
  echo "  - replicaCount: $1"
  echo "    machineSpec:"
  if [[ "${2:-}" == cpu ]]; then
    echo "      machineType: ${ps_machine}"
  else
    echo "      machineType: ${machine}"
    echo "      acceleratorType: ${accelerator}"
    echo "      acceleratorCount: ${accelerators}"
  fi
  cat <<YAML
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
  if (( ps > 0 )); then pool "$ps" cpu; fi
} > "$spec"
cmd=(gcloud ai custom-jobs create "--project=${project}" "--region=${region}"
     "--display-name=${name}" "--config=${spec}")
if [[ $dry_run == 1 ]]; then
  cat "$spec"
  printf '%q ' "${cmd[@]}"; echo
else
  "${cmd[@]}"
fi
