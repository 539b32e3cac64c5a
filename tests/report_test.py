"""The run's history and its report: resume keeps the epochs the checkpoint holds; the PNG."""

import io
import json

import pytest
from PIL import Image

from trainer import report


def _history(path, epochs=3, write=True):
  history = report.EpochLog(str(path / "history.json"), write)
  for e in range(1, epochs + 1):
    history.add(e, 1.0 / e, 1000.0 * e, 2.0, {"rmse": 1.2 - 0.1 * e, "count": 10})
  history.save()
  return history


def test_history_accumulates_time_and_drops_epochs_past_the_checkpoint(tmp_path):
  history = _history(tmp_path)
  assert [e["elapsed_seconds"] for e in history.epochs] == [2.0, 4.0, 6.0]
  assert history.epochs[0]["eval"] == {"rmse": pytest.approx(1.1)}  # counts left out
  resumed = report.EpochLog.resume(str(tmp_path), True, done_epochs=2)  # epoch 3 was lost
  assert [e["epoch"] for e in resumed.epochs] == [1, 2]
  resumed.add(3, 0.3, 3000.0, 5.0, {"rmse": 0.95})
  assert resumed.elapsed_seconds == 9.0
  assert report.EpochLog.resume(str(tmp_path), True, done_epochs=0).epochs == []  # afresh


def test_first_epoch_reaching_a_target(tmp_path):
  history = _history(tmp_path)
  assert history.first_reaching("rmse", lambda v: v <= 1.0)["epoch"] == 2
  assert history.first_reaching("rmse", lambda v: v <= 0.5) is None
  assert history.first_reaching("hr_full", lambda v: True) is None


def test_only_the_writing_task_writes(tmp_path):
  _history(tmp_path, write=False)
  assert not (tmp_path / "history.json").exists()


def test_the_report_is_a_png_with_its_panels(tmp_path):
  history = _history(tmp_path)
  path = report.write_report(history, str(tmp_path), "mf (explicit)", "rmse", target=0.95)
  data = (tmp_path / "report.png").read_bytes()
  assert path == str(tmp_path / "report.png") and data[:8] == b"\x89PNG\r\n\x1a\n"
  with Image.open(io.BytesIO(data)) as image:
    assert image.size == (880, 600)
    assert image.text["Title"] == "mf (explicit)"
    assert image.text["Description"].split("; ") == ["panels: " + report.PANELS[0],
                                                     *report.PANELS[1:]]
    # Not a blank canvas: the plots put many colours on it.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 16) or []) > 50
  assert json.loads((tmp_path / "history.json").read_text())["epochs"][2]["epoch"] == 3
