#!/usr/bin/env bash
# The whole job on one machine, offline: prepare synthetic ratings, train seed_mlp with
# MirroredStrategy over two logical CPUs, evaluate, export a SavedModel, recommend.
#
# Usage: scripts/demo.sh [OUTPUT_DIR]    (default: ./runs/demo; local or gs://)
# Extra training flags can be passed in TRAIN_FLAGS, e.g. TRAIN_FLAGS="--epochs=5".
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
out="${1:-runs/demo}"
python="${PYTHON:-python}"
metrics="$(mktemp)"
trap 'rm -f "${metrics}"' EXIT

echo "== 1/3 prepare: synthetic ratings -> ${out}/data"
"$python" -m trainer.prepare --source=synthetic --output_dir="${out}/data" \
  --num_users=2000 --num_items=1000 --num_ratings=200000 --num_shards=4 --seed=0

echo "== 2/3 train + evaluate + export: seed_mlp on 2 logical CPUs -> ${out}/model"
# shellcheck disable=SC2086
"$python" -m trainer.task --data_dir="${out}/data" --model_dir="${out}/model" \
  --model=seed_mlp --num_cpu_devices=2 --epochs=3 --batch_size=1024 \
  --learning_rate=0.002 ${TRAIN_FLAGS:-} | tail -n 1 > "${metrics}"
"$python" - "${metrics}" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
print(f"eval RMSE {m['eval_rmse']:.4f} (MAE {m['eval_mae']:.4f}) after {m['epochs']} epochs on "
      f"{m['replicas']} replicas; predicting the global mean gives RMSE "
      f"{m['eval_rmse_global_mean_baseline']:.4f}")
print(f"report (loss, eval metrics, time, examples/s per epoch): {m['report']}")
PY

echo "== 3/3 recommend from the exported SavedModel"
"$python" -m trainer.recommend --export_dir="${out}/model/export" --user=u0 --k=10
