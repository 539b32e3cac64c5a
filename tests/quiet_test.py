"""A run prints our lines only: no TensorFlow start-up chatter, no per-save INFO of its own;
--verbosity=1 brings TensorFlow's back."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import REPO_ROOT
from trainer import quiet

pytestmark = pytest.mark.slow

# An absl log line: level, date, time, thread, file:line].
_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\]")
OURS = {p.name for p in (REPO_ROOT / "trainer").rglob("*.py")}


def _demo(tmp_path: pathlib.Path, *extra: str):
  """The demo's three commands, small: every line each prints (stdout and stderr)."""
  # As a user's shell runs them: TF_CPP_MIN_LOG_LEVEL not set (run_cli sets it).
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  out = {}
  for name, module, args in (
      ("prepare", "trainer.prepare", (f"--output_dir={tmp_path / 'data'}", "--num_users=200",
                                      "--num_items=100", "--num_ratings=5000")),
      ("train", "trainer.task", (f"--data_dir={tmp_path / 'data'}",
                                 f"--model_dir={tmp_path / 'model'}", "--model=seed_mlp",
                                 "--num_cpu_devices=2", "--epochs=1", "--batch_size=256")),
      ("recommend", "trainer.recommend", (f"--export_dir={tmp_path / 'model' / 'export'}",
                                          "--user=u0", "--k=3"))):
    result = subprocess.run([sys.executable, "-m", module, *args, *extra], cwd=REPO_ROOT,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out[name] = [line for line in (result.stderr + result.stdout).splitlines() if line.strip()]
  return out


def test_a_run_prints_our_lines_only_and_verbosity_brings_tensorflows_back(tmp_path):
  quiet_run = _demo(tmp_path / "quiet")
  for name, lines in quiet_run.items():
    for line in lines:
      assert not quiet.chatter(line), (name, line)
      logged = _LOG_LINE.match(line)
      assert logged is None or logged.group(1) in OURS, (name, line)
  # What is left is ours, counted: the accounts of preparation and its JSON; training's
  # strategy, plan, progress, epoch, phases, best, export and final lines and its JSON; the
  # ranking.
  assert len(quiet_run["prepare"]) == 4, quiet_run["prepare"]
  assert len(quiet_run["train"]) <= 15, quiet_run["train"]
  assert any("Exported SavedModel" in line for line in quiet_run["train"])
  assert len(quiet_run["recommend"]) == 4, quiet_run["recommend"]
  verbose_run = _demo(tmp_path / "verbose", "--verbosity=1")
  theirs = [line for lines in verbose_run.values() for line in lines
            if (_LOG_LINE.match(line) and _LOG_LINE.match(line).group(1) not in OURS)
            or quiet.chatter(line)]
  assert len(theirs) > 5, verbose_run
