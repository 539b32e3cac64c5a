"""A run's history, epoch by epoch, and its picture: `history.json` and `report.png`.

The chief appends each epoch's figures (train loss, examples/s, eval metrics, elapsed time) to
`<model_dir>/history.json` as the epoch ends, so a resumed run keeps the epochs of the runs
before it (entries past the restored checkpoint are dropped: they will be trained again). At
the end it draws `<model_dir>/report.png`: train loss, the eval metrics, the primary metric
against elapsed time (what "time to accuracy" reads off), and training examples/s, per epoch.

Elapsed time is training plus evaluation, summed over the epochs (of every process that ran
them): what it took to get there, without start-up or the export.
"""

import io
import json
from typing import Dict, List, Optional, Sequence

import keras
import tensorflow as tf
from absl import logging

from trainer import fileio, strict_json
from trainer.config import TrainConfig
from trainer.loop import EpochStats

HISTORY_FILE = "history.json"
REPORT_FILE = "report.png"
PANELS = ("train loss", "eval metrics", "primary metric against elapsed time",
          "train examples/s")


class EpochLog:
  """The epochs so far: [{epoch, loss, examples_per_sec, elapsed_seconds, eval: {...}}]."""

  def __init__(self, path: str, write: bool, epochs: Optional[List[Dict]] = None):
    self.path, self.write = path, write
    self.epochs: List[Dict] = list(epochs or [])

  @classmethod
  def resume(cls, model_dir: str, write: bool, done_epochs: int) -> "EpochLog":
    """The history of `model_dir` up to epoch `done_epochs` (what the checkpoint holds)."""
    path = fileio.join(model_dir, HISTORY_FILE)
    epochs = []
    if done_epochs and tf.io.gfile.exists(path):
      epochs = [e for e in json.loads(fileio.read_text(path))["epochs"]
                if e["epoch"] <= done_epochs]
    return cls(path, write, epochs)

  @property
  def elapsed_seconds(self) -> float:
    return self.epochs[-1]["elapsed_seconds"] if self.epochs else 0.0

  def add(self, epoch: int, loss: float, examples_per_sec: float, seconds: float,
          eval_metrics: Dict[str, float]) -> None:
    """Records epoch `epoch` (1-based) that took `seconds` to train and evaluate."""
    self.epochs.append({"epoch": epoch, "loss": loss, "examples_per_sec": examples_per_sec,
                        "elapsed_seconds": self.elapsed_seconds + seconds,
                        "eval": {k: v for k, v in eval_metrics.items()
                                 if not k.startswith("count")}})

  def save(self) -> None:
    """Writes the history (on the task that writes it; safe to repeat)."""
    if self.write:
      fileio.write_text_atomic(self.path,
                               strict_json.dumps({"epochs": self.epochs}, indent=1) + "\n")

  def first_reaching(self, metric: str, reached) -> Optional[Dict]:
    """The first epoch whose `metric` satisfies `reached(value)`, or None."""
    return next((e for e in self.epochs if metric in e["eval"] and reached(e["eval"][metric])),
                None)


def render(epochs: Sequence[Dict], title: str, primary: str,
           target: Optional[float] = None) -> bytes:
  """The report as PNG bytes: the four `PANELS`, named in the PNG's Description."""
  import matplotlib  # imported here: only the chief's last step needs it
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  x = [e["epoch"] for e in epochs]
  figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
  figure.suptitle(title)
  loss, metrics, timed, speed = axes.flat
  loss.plot(x, [e["loss"] for e in epochs], marker="o")
  loss.set(title=PANELS[0], xlabel="epoch", ylabel="loss")
  for name in sorted({n for e in epochs for n in e["eval"]}):
    points = [(e["epoch"], e["eval"][name]) for e in epochs if name in e["eval"]]
    metrics.plot(*zip(*points), marker="o", label=name,
                 linewidth=2.5 if name == primary else 1.2)
  metrics.set(title=PANELS[1], xlabel="epoch")
  metrics.legend(fontsize="small")
  points = [(e["elapsed_seconds"], e["eval"][primary]) for e in epochs if primary in e["eval"]]
  if points:
    timed.plot(*zip(*points), marker="o", label=primary)
  if target is not None:
    timed.axhline(target, linestyle="--", color="grey", label=f"target {target:g}")
  timed.set(title=PANELS[2], xlabel="elapsed seconds (training + evaluation)", ylabel=primary)
  timed.legend(fontsize="small")
  speed.bar(x, [e["examples_per_sec"] for e in epochs])
  speed.set(title=PANELS[3], xlabel="epoch", ylabel="examples/s")
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=80,
                 metadata={"Title": title, "Description": "panels: " + "; ".join(PANELS),
                           "Software": "neumf-trainer"})
  plt.close(figure)
  return buffer.getvalue()


def write_report(history: EpochLog, model_dir: str, title: str, primary: str,
                 target: Optional[float] = None) -> str:
  """Draws `history` to `<model_dir>/report.png` (local or gs://); returns its path."""
  path = fileio.join(model_dir, REPORT_FILE)
  png = render(history.epochs, title, primary, target)
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "wb") as f:
    f.write(png)
  tf.io.gfile.rename(tmp, path, overwrite=True)
  return path


def shown(eval_metrics: Dict[str, float]) -> str:
  return " ".join(f"{k} {v:.4f}" for k, v in sorted(eval_metrics.items())
                  if not k.startswith("count"))


class EpochBoard:
  """The end-of-epoch log line and TensorBoard scalars (written by the chief only)."""

  def __init__(self, config: TrainConfig, optimizer: keras.optimizers.Optimizer, chief: bool):
    self.config, self.optimizer = config, optimizer
    self.writer = (tf.summary.create_file_writer(config.resolved_log_dir) if chief
                   else tf.summary.create_noop_writer())

  def write(self, epoch: int, stats: EpochStats, eval_metrics: Dict[str, float],
            improved: bool) -> None:
    logging.info("epoch %d/%d train loss %.4f eval %s%s; %.0f train examples/s", epoch,
                 self.config.epochs, stats.loss, shown(eval_metrics),
                 " (best)" if improved else "", stats.examples_per_sec)
    rate = self.optimizer.learning_rate
    with self.writer.as_default(step=epoch):
      tf.summary.scalar("train/loss", stats.loss)
      tf.summary.scalar("train/examples_per_sec", stats.examples_per_sec)
      tf.summary.scalar("train/learning_rate", float(rate.numpy() if hasattr(rate, "numpy")
                                                     else rate))
      for name, v in eval_metrics.items():
        if not name.startswith("count"):
          tf.summary.scalar(f"eval/{name}", v)
    try:
      self.writer.flush()
    except tf.errors.OpError as err:  # TensorBoard is not worth failing a run for
      logging.warning("Could not write TensorBoard summaries to %s: %s",
                      self.config.resolved_log_dir, fileio.first_line(err))
