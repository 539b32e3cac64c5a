#!/usr/bin/env bash
# A local debug run of training on prepared data: one process with MirroredStrategy over
# logical CPUs, or a real multi-worker cluster of local processes on 127.0.0.1.
#
# Usage: scripts/local_debug.sh --data-dir DIR --model-dir DIR [--workers N] [--devices N]
#            [--dry-run] [-- TRAINER_FLAGS...]
#   --workers   N > 1 starts N worker processes with TF_CONFIG (MultiWorkerMirroredStrategy);
#               their logs go to MODEL_DIR.workerI.log (default 1)
#   --devices   logical CPU devices of a single process (default 2)
#   --dry-run   print the commands (with their TF_CONFIG) instead of running them
set -euo pipefail

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
data_dir="" model_dir="" workers=1 devices=2 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data-dir) data_dir="${2:?--data-dir needs a value}"; shift 2 ;;
    --model-dir) model_dir="${2:?--model-dir needs a value}"; shift 2 ;;
    --workers) workers="${2:?--workers needs a value}"; shift 2 ;;
    --devices) devices="${2:?--devices needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) echo "local_debug.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ -n "$data_dir" && -n "$model_dir" ]] || { echo "local_debug.sh: --data-dir and --model-dir are required" >&2; exit 2; }
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "local_debug.sh: --workers must be a positive count, got '${workers}'" >&2; exit 2; }
python="${PYTHON:-python}"
base=("$python" -m trainer.task "--data_dir=${data_dir}" "--model_dir=${model_dir}")

if (( workers == 1 )); then
  cmd=("${base[@]}" "--num_cpu_devices=${devices}" "$@")
  if [[ $dry_run == 1 ]]; then printf '%q ' "${cmd[@]}"; echo; else exec "${cmd[@]}"; fi
fi

ports="$("$python" - "$workers" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)"
cluster="$(printf '"127.0.0.1:%s",' $ports)"
cluster="{\"worker\": [${cluster%,}]}"
pids=()
for ((i = 0; i < workers; i++)); do
  tf_config="{\"cluster\": ${cluster}, \"task\": {\"type\": \"worker\", \"index\": ${i}}}"
  if [[ $dry_run == 1 ]]; then
    printf 'TF_CONFIG=%q ' "$tf_config"; printf '%q ' "${base[@]}" "$@"; echo
  else
    TF_CONFIG="$tf_config" "${base[@]}" "$@" > "${model_dir%/}.worker${i}.out" \
      2> "${model_dir%/}.worker${i}.log" &
    pids+=($!)
  fi
done
[[ $dry_run == 1 ]] && exit 0
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
cat "${model_dir%/}.worker0.out"
exit "$status"
