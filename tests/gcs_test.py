"""gs:// paths end to end against a local Cloud Storage emulator (see gcs_emulator.py).

The product's unmodified code runs in subprocesses pointed at the emulator: TensorFlow's own GCS
filesystem for data, checkpoints, TensorBoard, metrics and the SavedModel; google-cloud-storage
for the start-up bucket check. Nothing leaves 127.0.0.1.
"""

import json
import os
import random
import time

import pytest

from conftest import run_cli
from gcs_emulator import GcsEmulator
from resumable import COMPARED, DATA_FLAGS, Run, train_command

pytestmark = pytest.mark.slow

BUCKET = "neumf-test"
# Fewer, slower checkpoints than the local test: each is ~20 MB through the emulator.
GCS_FLAGS = ("--checkpoint_every_steps=60", "--storage_retries=1")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  emulator = GcsEmulator(str(tmp_path_factory.mktemp("gcs")))
  emulator.start()
  emulator.create_bucket(BUCKET)
  yield emulator
  emulator.stop()


@pytest.fixture(scope="module")
def gcs_data(gcs):
  data_dir = f"gs://{BUCKET}/data"
  run_cli("trainer.prepare", f"--output_dir={data_dir}", *DATA_FLAGS, env=gcs.env())
  return data_dir


@pytest.fixture
def storage_client(gcs, monkeypatch):
  """google-cloud-storage in this process, on the emulator."""
  for key, value in gcs.env().items():
    if key in ("STORAGE_EMULATOR_HOST", "GOOGLE_CLOUD_PROJECT"):
      monkeypatch.setenv(key, value)
  from google.cloud import storage
  return storage.Client()


def _names(client, prefix):
  return sorted(b.name for b in client.list_blobs(BUCKET, prefix=prefix))


def test_prepared_data_on_gcs_is_identical_to_the_local_preparation(gcs_data, resume_data,
                                                                    storage_client):
  names = [n for n in _names(storage_client, "data") if not n.endswith("/")]  # no markers
  local = sorted(f"data/{n}" for n in os.listdir(resume_data))
  assert names == local  # and no temporary directory left beside it
  bucket = storage_client.bucket(BUCKET)
  for name in names:
    with open(os.path.join(resume_data, name.split("/", 1)[1]), "rb") as f:
      assert bucket.blob(name).download_as_bytes() == f.read(), name


def test_train_on_gcs_killed_and_resumed_ends_as_the_local_uninterrupted_run(
    gcs, gcs_data, uninterrupted, storage_client, tmp_path):
  model_dir = f"gs://{BUCKET}/run"
  command = train_command(gcs_data, model_dir, *GCS_FLAGS)
  run = Run(command, str(tmp_path / "killed.log"), env=gcs.env())
  assert run.wait_for(lambda: "Saved checkpoint" in run.log()), run.log()[-3000:]
  time.sleep(random.Random(7).uniform(0.0, 1.0))
  assert run.process.poll() is None, run.log()[-3000:]
  run.kill()
  final = Run(command, str(tmp_path / "final.log"), env=gcs.env())
  result = final.finish()
  assert "Resumed from gs://" in final.log()
  for key in COMPARED:
    assert result[key] == uninterrupted[key], key

  names = _names(storage_client, "run/")
  assert "run/export/saved_model.pb" in names
  assert any(n.startswith("run/logs/events.out.tfevents") for n in names)
  assert any(n.startswith("run/checkpoints/best/ckpt-") for n in names)
  assert "run/config.json" in names and "run/history.json" in names
  png = storage_client.bucket(BUCKET).blob("run/report.png").download_as_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  metrics = json.loads(storage_client.bucket(BUCKET).blob("run/metrics.json").download_as_text())
  assert metrics["weights_sha256"] == result["weights_sha256"]

  # The export serves straight from the bucket.
  out = run_cli("trainer.recommend", f"--export_dir={model_dir}/export", "--user=u3", "--k=5",
                env=gcs.env()).stdout
  lines = out.strip().splitlines()
  assert lines[0] == "Top 5 for user u3" and len(lines) == 6


def test_a_storage_outage_fails_clearly_and_a_restart_resumes(gcs, gcs_data, uninterrupted,
                                                              tmp_path):
  model_dir = f"gs://{BUCKET}/outage"
  command = train_command(gcs_data, model_dir, *GCS_FLAGS)
  run = Run(command, str(tmp_path / "outage.log"), env=gcs.env())
  try:
    assert run.wait_for(lambda: "Saved checkpoint" in run.log()), run.log()[-3000:]
    gcs.stop()
    started = time.time()
    run.process.wait(timeout=300)
  finally:
    gcs.start()
  log = run.log()
  assert run.process.returncode == 132, log[-3000:]  # retryable
  assert "Restart with the same command" in log and "resumes from the latest checkpoint" in log
  assert time.time() - started < 240
  result = Run(command, str(tmp_path / "after.log"), env=gcs.env()).finish()
  for key in COMPARED:
    assert result[key] == uninterrupted[key], key


def test_a_missing_bucket_is_refused_at_start_up(gcs, gcs_data, tmp_path):
  result = run_cli("trainer.task", f"--data_dir={gcs_data}", "--model_dir=gs://no-such-bucket/m",
                   check=False, env=gcs.env(), timeout=120)
  assert result.returncode == 2
  assert ("--model_dir=gs://no-such-bucket/m: bucket gs://no-such-bucket does not exist"
          in result.stderr)
  result = run_cli("trainer.prepare", "--output_dir=gs://no-such-bucket/data", check=False,
                   env=gcs.env(), timeout=120)
  assert result.returncode == 2
  assert "--output_dir=gs://no-such-bucket/data: bucket gs://no-such-bucket does not exist" in (
      result.stderr)


def test_the_bucket_check_reads_and_writes_through_google_cloud_storage(storage_client):
  from trainer import fileio
  fileio.check_gcs_access(f"gs://{BUCKET}/probe/here", "model_dir", write=True)
  assert not _names(storage_client, "probe/")  # the probe object is gone again
  fileio.check_gcs_access(f"gs://{BUCKET}/data", "data_dir", write=False)
  with pytest.raises(fileio.StorageError, match="bucket gs://missing-b does not exist") as e:
    fileio.check_gcs_access("gs://missing-b/x", "data_dir", write=False)
  assert not e.value.retryable


def test_prepare_reads_a_csv_glob_from_gcs(gcs, storage_client):
  bucket = storage_client.bucket(BUCKET)
  rows = [f"u{n % 40},i{n % 23},{1 + n % 5},{1000 + n}" for n in range(900)]
  for part in range(3):
    bucket.blob(f"raw/part-{part}.csv").upload_from_string(
        "user,item,rating,ts\n" + "\n".join(rows[part * 300:(part + 1) * 300]) + "\n")
  result = run_cli("trainer.prepare", "--source=csv", f"--input=gs://{BUCKET}/raw/part-*.csv",
                   "--user_column=user", "--item_column=item", "--rating_column=rating",
                   "--timestamp_column=ts", "--split=temporal", "--eval_fraction=0.2",
                   "--duplicates=keep_latest", f"--output_dir=gs://{BUCKET}/csvdata",
                   "--num_shards=2", env=gcs.env())
  metadata = json.loads(bucket.blob("csvdata/metadata.json").download_as_text())
  assert metadata["rows_read"] == 900
  assert metadata["inputs"] == [f"gs://{BUCKET}/raw/part-{p}.csv" for p in range(3)]
  assert metadata["num_users"] == 40 and metadata["num_items"] == 23
  assert json.loads(result.stdout.strip().splitlines()[-1])["num_train"] == metadata["num_train"]


_JOURNALED = """
import os, sys
import tensorflow as tf
from trainer import input_service, localhost
port = localhost.free_ports(1)[0]
dispatcher = input_service.start_dispatcher(sys.argv[1], port)
worker = input_service.start_data_worker(f"127.0.0.1:{port}", "127.0.0.1", wait=False)
service = tf.data.experimental.service
ds = tf.data.Dataset.range(10)
dataset_id = service.register_dataset(dispatcher.target, ds, dataset_id="r")
got = service.from_dataset_id(service.ShardingPolicy.DYNAMIC, dispatcher.target, dataset_id,
                              element_spec=ds.element_spec, job_name="j")
print(sorted(int(x) for x in got.as_numpy_iterator()), flush=True)
os._exit(0)  # not the servers' teardown (tensorflow/tensorflow#113163)
"""


def test_the_input_services_journal_goes_to_a_gcs_model_dir(gcs, storage_client):
  """--input_service's dispatcher journals under <model_dir>/input_service, gs:// included."""
  import subprocess
  import sys
  from conftest import REPO_ROOT
  done = subprocess.run([sys.executable, "-c", _JOURNALED, f"gs://{BUCKET}/svc"], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, **gcs.env(), PYTHONPATH=str(REPO_ROOT)))
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip().splitlines()[-1] == str(list(range(10)))
  assert _names(storage_client, "svc/input_service/"), "no journal written"
