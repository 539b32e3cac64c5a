"""Exact resume: the real trainer process SIGKILLed at random points, restarted, and compared.

A run killed several times (at random moments, mid-epoch, and inside a checkpoint write) and
restarted each time with the same command must end with the same metrics and the same weights,
bit for bit, as one uninterrupted run: with --deterministic on CPU nothing else is acceptable.
The model covers every kind of saved state: NeuMF with dropout (random generator states),
lazy Adam with warm-up and decay (optimizer slots, step count), sampled negatives (keyed by the
step) and the input pipeline's position mid-epoch.
"""

import json
import os
import random
import time

import pytest

from conftest import last_json_line, run_cli
from resumable import BATCH, COMPARED, DATA_FLAGS, Run, train_command

pytestmark = pytest.mark.slow

def _checkpoint_in_progress(checkpoint_dir: str) -> bool:
  try:
    return any(name.endswith("_temp") for name in os.listdir(checkpoint_dir))
  except FileNotFoundError:
    return False


def test_a_run_killed_at_random_points_ends_exactly_as_an_uninterrupted_one(
    resume_data, uninterrupted, tmp_path):
  model_dir = str(tmp_path / "model")
  checkpoints = os.path.join(model_dir, "checkpoints")
  rng = random.Random(20261128)
  command = train_command(resume_data, model_dir)
  kills = ["random", "during_checkpoint_write", "random", "random"]
  logs = []
  for n, kind in enumerate(kills):
    run = Run(command, str(tmp_path / f"run{n}.log"))
    logs.append(run.log_path)
    # Let it get past start-up and resume into training first.
    assert run.wait_for(lambda: " step " in run.log()), run.log()[-3000:]
    if kind == "random":
      time.sleep(rng.uniform(0.0, 2.0))
    else:
      assert run.wait_for(lambda: _checkpoint_in_progress(checkpoints), poll=0.001)
    if run.process.poll() is not None:
      pytest.fail(f"run {n} finished before it could be killed; log:\n{run.log()[-3000:]}")
    run.kill()
  final = Run(command, str(tmp_path / "final.log"))
  result = final.finish()
  resumed = [line for path in logs[1:] + [final.log_path] for line in open(path)
             if "Resumed from" in line]
  assert len(resumed) == len(kills), "every restart resumed from a checkpoint"
  # At least one restart continued mid-epoch (not at an epoch boundary).
  steps_per_epoch = json.loads(open(os.path.join(resume_data, "metadata.json")).read())
  steps_per_epoch = steps_per_epoch["num_train"] // (BATCH // 3)
  steps = [int(line.rsplit("step ", 1)[1].rstrip(")\n")) for line in resumed]
  assert any(s % steps_per_epoch for s in steps), steps
  for key in COMPARED:
    assert result[key] == uninterrupted[key], key


def test_a_run_with_context_killed_mid_epoch_resumes_exactly(tmp_path):
  """The same, with context in the records, the batches (negatives repeat their positive's)
  and the model: one kill in the middle of the first epoch."""
  data_dir = str(tmp_path / "data")
  run_cli("trainer.prepare", f"--output_dir={data_dir}", *DATA_FLAGS,
          "--context=hour,weekday,tenure")
  reference = last_json_line(run_cli("trainer.task", *train_command(
      data_dir, str(tmp_path / "reference"))[3:]).stdout)
  command = train_command(data_dir, str(tmp_path / "model"))
  run = Run(command, str(tmp_path / "killed.log"))
  assert run.wait_for(lambda: " step 10/" in run.log()), run.log()[-3000:]
  run.kill()
  final = Run(command, str(tmp_path / "final.log"))
  result = final.finish()
  assert "Resumed from" in final.log()
  for key in COMPARED:
    assert result[key] == reference[key], key
