"""Tests of storage retries and the start-up access check (gs:// paths: see gcs_test.py)."""

import pytest
import tensorflow as tf

from trainer import fileio


def _flaky(failures, error=tf.errors.UnavailableError):
  calls = []

  def operation():
    calls.append(1)
    if len(calls) <= failures:
      raise error(None, None, f"transient failure {len(calls)}")
    return "written"

  return operation, calls


def test_a_transient_error_is_retried_with_backoff(monkeypatch):
  sleeps = []
  monkeypatch.setattr(fileio.time, "sleep", sleeps.append)
  operation, calls = _flaky(2)
  assert fileio.retry(operation, "writing x", retries=3, first_delay=2.0) == "written"
  assert len(calls) == 3
  assert sleeps == [2.0, 4.0]  # exponential backoff


def test_a_persistent_error_fails_clearly_after_the_retries(monkeypatch):
  monkeypatch.setattr(fileio.time, "sleep", lambda s: None)
  operation, calls = _flaky(10, tf.errors.AbortedError)
  with pytest.raises(fileio.StorageError,
                     match=r"writing checkpoint 7 to gs://b/c failed 3 time\(s\); last error: "
                           r"AbortedError: transient failure 3") as e:
    fileio.retry(operation, "writing checkpoint 7 to gs://b/c", retries=2)
  assert e.value.retryable
  assert len(calls) == 3


def test_a_non_transient_error_is_not_retried(monkeypatch):
  monkeypatch.setattr(fileio.time, "sleep", lambda s: None)
  operation, calls = _flaky(1, tf.errors.PermissionDeniedError)
  with pytest.raises(tf.errors.PermissionDeniedError):
    fileio.retry(operation, "writing x", retries=5)
  assert len(calls) == 1


def test_local_paths_need_no_bucket_check():
  fileio.check_gcs_access("/tmp/anything", "model_dir", write=True)  # no client, no network


def test_missing_credentials_are_named_at_start_up(monkeypatch, tmp_path):
  """No emulator, no key file, no gcloud login and no metadata server: the check says so."""
  for name in ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path))  # no application-default login here
  monkeypatch.setenv("NO_GCE_CHECK", "true")  # do not probe for a metadata server
  with pytest.raises(fileio.StorageError, match=r"--model_dir=gs://bkt/run: no Google Cloud "
                                                r"credentials .* `gcloud auth application-default"
                                                r" login") as e:
    fileio.check_gcs_access("gs://bkt/run", "model_dir", write=True)
  assert not e.value.retryable


def test_a_path_without_a_bucket_is_refused():
  with pytest.raises(fileio.StorageError, match="--data_dir=gs://: no bucket name"):
    fileio.check_gcs_access("gs://", "data_dir", write=False)
