#!/usr/bin/env python3
"""Renders a manifest template of k8s/ by filling its ${VARIABLES}.

Values come from --set KEY=VALUE, then the environment, then the defaults below. A variable
without a value is an error naming it: a manifest is never applied half-filled. Tracked
templates are never edited.

  scripts/render_manifest.py k8s/job.yaml --set IMAGE=REGISTRY/neumf-trainer:abc123 \
      --set DATA_DIR=gs://BUCKET/data --set MODEL_DIR=gs://BUCKET/runs/1 | kubectl apply -f -
"""

import argparse
import os
import pathlib
import re
import string
import sys

DEFAULTS = {
    "JOB_NAME": "neumf-train",
    "SERVICE_ACCOUNT": "neumf-trainer",
    "ACCELERATOR": "nvidia-tesla-t4",
    "MODEL": "seed_mlp",
    "EPOCHS": "10",
    "BATCH_SIZE": "8192",
    "CPU": "8",
    "MEMORY": "32Gi",
    "GPUS": "1",
    "SHM_SIZE": "8Gi",
    "WORKERS": "2",
    "PS": "2",  # parameter-server TFJob (k8s/tfjob_ps.yaml): ps replicas, CPU and memory each
    "PS_CPU": "4",
    "PS_MEMORY": "64Gi",
    "DATA_WORKERS": "0",  # data-only tf.data service workers (k8s/data_workers.yaml)
    "DATA_WORKER_CPU": "8",
    "DATA_WORKER_MEMORY": "16Gi",
    "SCHEDULE": "0 3 * * *",  # daily retraining (k8s/cronjob.yaml), UTC
    "LOOKBACK_DAYS": "7",
}


def render(template_text: str, values: dict) -> str:
  """Fills every ${NAME} of the template; raises KeyError listing names without values."""
  template = string.Template(template_text)
  names = {m.group("braced") or m.group("named") for m in template.pattern.finditer(template_text)
           if m.group("braced") or m.group("named")}
  missing = sorted(n for n in names if n not in values)
  if missing:
    raise KeyError(f"no value for {', '.join(missing)} (use --set NAME=VALUE or the environment)")
  image = values.get("IMAGE", "")
  if "IMAGE" in names and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
    raise ValueError(f"IMAGE={image!r} needs an explicit tag other than latest (e.g. a git SHA)")
  return template.substitute(values)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("template", type=pathlib.Path, help="a manifest template of k8s/")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a value; repeat for several")
  args = parser.parse_args(argv)
  values = dict(DEFAULTS)
  values.update({k: v for k, v in os.environ.items() if re.fullmatch(r"[A-Z][A-Z0-9_]*", k)})
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep or not key:
      parser.error(f"--set {item!r} is not KEY=VALUE")
    values[key] = value
  try:
    sys.stdout.write(render(args.template.read_text(encoding="utf-8"), values))
  except (KeyError, ValueError) as e:
    print(f"render_manifest: {args.template}: {e.args[0]}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
