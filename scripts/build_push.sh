#!/usr/bin/env bash
# Builds the training image and pushes it, tagged with the git commit (never :latest).
#
# Usage: scripts/build_push.sh --registry REGISTRY [--base-image IMAGE] [--allow-dirty] [--dry-run]
#   --registry     e.g. us-docker.pkg.dev/PROJECT/REPO (the image is REGISTRY/neumf-trainer:SHA)
#   --base-image   build ARG BASE_IMAGE (default tensorflow/tensorflow:2.21.0-gpu)
#   --allow-dirty  build even with uncommitted changes (the tag then ends in -dirty)
#   --dry-run      print the commands instead of running them
# Prints the image reference on the last line.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
registry="" base="tensorflow/tensorflow:2.21.0-gpu" allow_dirty=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --registry) registry="${2:?--registry needs a value}"; shift 2 ;;
    --base-image) base="${2:?--base-image needs a value}"; shift 2 ;;
    --allow-dirty) allow_dirty=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build_push.sh: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
done
[[ -n "$registry" ]] || { echo "build_push.sh: --registry is required" >&2; exit 2; }
cd "$(dirname "$0")/.."
tag="$(git rev-parse --short=12 HEAD)"
if [[ -n "$(git status --porcelain)" ]]; then
  [[ $allow_dirty == 1 ]] || { echo "build_push.sh: uncommitted changes; commit, or pass --allow-dirty" >&2; exit 2; }
  tag="${tag}-dirty"
fi
image="${registry%/}/neumf-trainer:${tag}"
run() { if [[ $dry_run == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi; }
run docker build --build-arg "BASE_IMAGE=${base}" -t "$image" .
run docker push "$image"
echo "$image"
