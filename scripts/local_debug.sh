#!/usr/bin/env bash
# A local debug run of training on prepared data: one process with MirroredStrategy over
# logical CPUs, or a real cluster of local processes on 127.0.0.1.
#
# Usage: scripts/local_debug.sh --data-dir DIR --model-dir DIR [--workers N] [--ps M]
#            [--per-worker-input] [--data-workers K] [--devices N] [--dry-run]
#            [-- TRAINER_FLAGS...]
#   --workers   N > 1 starts N worker processes with TF_CONFIG (MultiWorkerMirroredStrategy);
#               their logs go to MODEL_DIR.workerI.log (default 1)
#   --ps        M > 0 starts a parameter-server cluster instead: a chief, N workers and M ps
#               tasks (ParameterServerStrategy); logs MODEL_DIR.{chief0,workerI,psI}.log.
#               Its input comes from the tf.data service (--input_service, the dispatcher
#               on the chief at a free port, a data worker in each worker task)
#   --per-worker-input  with --ps: each worker reads all the data itself instead
#   --data-workers  with --ps: K data-only processes produce the batches instead of the
#               worker tasks (--data_workers=K); logs MODEL_DIR.data_workerI.log
#   --devices   logical CPU devices of a single process (default 2)
#   --dry-run   print the commands (with their TF_CONFIG) instead of running them
set -euo pipefail

usage() { sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; }
data_dir="" model_dir="" workers=1 ps=0 devices=2 dry_run=0 service=1 data_workers=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --per-worker-input) service=0; shift ;;
    --data-workers) data_workers="${2:?--data-workers needs a value}"; shift 2 ;;
    --data-dir) data_dir="${2:?--data-dir needs a value}"; shift 2 ;;
    --model-dir) model_dir="${2:?--model-dir needs a value}"; shift 2 ;;
    --workers) workers="${2:?--workers needs a value}"; shift 2 ;;
    --ps) ps="${2:?--ps needs a value}"; shift 2 ;;
    --devices) devices="${2:?--devices needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local_debug.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ -n "$data_dir" && -n "$model_dir" ]] || { echo "local_debug.sh: --data-dir and --model-dir are required" >&2; exit 2; }
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "local_debug.sh: --workers must be a positive count, got '${workers}'" >&2; exit 2; }
[[ "$ps" =~ ^[0-9]+$ ]] || { echo "local_debug.sh: --ps must be a count, got '${ps}'" >&2; exit 2; }
[[ "$data_workers" =~ ^[0-9]+$ ]] || { echo "local_debug.sh: --data-workers must be a count, got '${data_workers}'" >&2; exit 2; }
(( data_workers == 0 || (ps > 0 && service == 1) )) || { echo "local_debug.sh: --data-workers needs --ps and the tf.data service (not --per-worker-input)" >&2; exit 2; }
python="${PYTHON:-python}"
base=("$python" -m trainer.task "--data_dir=${data_dir}" "--model_dir=${model_dir}")

if (( workers == 1 && ps == 0 )); then
  cmd=("${base[@]}" "--num_cpu_devices=${devices}" "$@")
  if [[ $dry_run == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
fi

tasks=()  # "type index" in start order: ps, then workers, then the chief
if (( ps > 0 )); then
  for ((i = 0; i < ps; i++)); do tasks+=("ps $i"); done
  for ((i = 0; i < workers; i++)); do tasks+=("worker $i"); done
  tasks+=("chief 0")
else
  for ((i = 0; i < workers; i++)); do tasks+=("worker $i"); done
fi
ports=($("$python" -m trainer.localhost "$(( ${#tasks[@]} + 1 ))"))
dispatcher_port="${ports[${#tasks[@]}]}"
if (( ps > 0 && service == 1 )); then
  set -- --input_service "--input_service_port=${dispatcher_port}" --data_worker_port=0 \
    "--data_workers=${data_workers}" "$@"
fi
cluster="$("$python" - "${ports[*]}" "${tasks[@]}" <<'PY'
import json, sys
ports, tasks = sys.argv[1].split(), [t.split()[0] for t in sys.argv[2:]]
cluster = {}
for task_type, port in zip(tasks, ports):
    cluster.setdefault(task_type, []).append(f"127.0.0.1:{port}")
print(json.dumps(cluster))
PY
)"
main="${model_dir%/}.worker0"  # whose output is the run's: worker 0's, or the chief's
(( ps == 0 )) || main="${model_dir%/}.chief0"
pids=() servers=()
for task in "${tasks[@]}"; do
  read -r type index <<< "$task"
  tf_config="{\"cluster\": ${cluster}, \"task\": {\"type\": \"${type}\", \"index\": ${index}}}"
  if [[ $dry_run == 1 ]]; then
    printf 'TF_CONFIG=%q ' "$tf_config"; printf '%q ' "${base[@]}" "$@"; echo
    continue
  fi
  TF_CONFIG="$tf_config" "${base[@]}" "$@" > "${model_dir%/}.${type}${index}.out" \
    2> "${model_dir%/}.${type}${index}.log" &
  # In a parameter-server cluster the ps and worker tasks serve until stopped.
  if (( ps > 0 )) && [[ "$type" != chief ]]; then servers+=($!); else pids+=($!); fi
done
for ((i = 0; i < data_workers; i++)); do
  cmd=("$python" -m trainer.input_service --dispatcher "127.0.0.1:${dispatcher_port}"
       --host 127.0.0.1 --port 0)
  if [[ $dry_run == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; continue; fi
  "${cmd[@]}" > /dev/null 2> "${model_dir%/}.data_worker${i}.log" &
  servers+=($!)
done
[[ $dry_run == 1 ]] && exit 0
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
for pid in "${servers[@]}"; do kill "$pid" 2> /dev/null || true; done
cat "${main}.out"
exit "$status"
