"""File access for paths that may be local or `gs://`.

Every path a user gives goes through `tf.io.gfile`, never through `open()`, so that the same
code reads and writes local disks and Cloud Storage buckets.
"""

import posixpath
import time
import uuid
from typing import Callable, List, Optional, TypeVar

import tensorflow as tf
from absl import logging

from trainer.errors import StorageError  # noqa: F401 (raised here; part of this module's API)

T = TypeVar("T")


def join(base: str, *parts: str) -> str:
  """Joins path parts; works for local paths and URLs such as `gs://bucket/dir`."""
  if "://" in base:
    return posixpath.join(base, *parts)
  return tf.io.gfile.join(base, *parts)


def read_text(path: str) -> str:
  with tf.io.gfile.GFile(path, "r") as f:
    return f.read()


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` so that a reader never sees a half-written file.

  The text goes to a temporary sibling first and is then renamed over `path`; on object stores
  the rename is a copy, which still publishes the complete object at once.
  """
  tmp = path + ".tmp"
  with tf.io.gfile.GFile(tmp, "w") as f:
    f.write(text)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def read_lines(path: str) -> List[str]:
  """Reads a text file of one entry per line (no trailing newline kept)."""
  return read_text(path).splitlines()


def write_lines(path: str, lines: List[str]) -> None:
  write_text_atomic(path, "".join(line + "\n" for line in lines))


def makedirs(path: str) -> None:
  tf.io.gfile.makedirs(path)


def exists(path: str) -> bool:
  return tf.io.gfile.exists(path)


def is_gcs(path: Optional[str]) -> bool:
  return bool(path) and path.startswith("gs://")


def first_line(error: BaseException) -> str:
  """The first line of an error's message (at most 400 characters), for one-line reports."""
  text = str(error).strip().splitlines()
  return text[0][:400] if text else type(error).__name__


# What a flaky network or an overloaded service raises through TensorFlow's filesystems.
# (TensorFlow's GCS client already retries each request; these are what remains afterwards.)
TRANSIENT_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError,
                    tf.errors.AbortedError, tf.errors.ResourceExhaustedError,
                    tf.errors.InternalError, tf.errors.UnknownError)


def retry(operation: Callable[[], T], what: str, retries: int = 3,
          first_delay: float = 2.0) -> T:
  """Runs `operation`, retrying transient storage errors with exponential backoff.

  Args:
    operation: the storage operation; it must be safe to repeat (whole-file writes are).
    what: names the operation and its path for log lines and the final error.
    retries: further attempts after the first.
    first_delay: seconds before the first retry; doubled each time.

  Raises:
    StorageError: still failing after the retries (the last error chained).
  """
  for attempt in range(retries + 1):
    try:
      return operation()
    except TRANSIENT_ERRORS as e:
      if attempt == retries:
        raise StorageError(f"{what} failed {retries + 1} time(s); last error: "
                           f"{type(e).__name__}: {first_line(e)}") from e
      delay = first_delay * 2**attempt
      logging.warning("%s failed (%s: %s); retrying in %.0f s (%d of %d)", what,
                      type(e).__name__, first_line(e), delay, attempt + 1, retries)
      time.sleep(delay)
  raise AssertionError("unreachable")


def check_gcs_access(path: str, flag: str, write: bool) -> None:
  """Fails fast, with a clear message, when a gs:// path cannot be read or written.

  Uses google-cloud-storage (which honours STORAGE_EMULATOR_HOST) to tell a missing bucket, a
  missing credential and a missing permission apart before any work starts; TensorFlow's own
  client would only fail later, after minutes of retries, with a less specific error. Writing is
  checked by creating and deleting a small probe object under the path. No-op for local paths.

  Raises:
    StorageError: naming the flag, the bucket and what is wrong.
  """
  if not is_gcs(path):
    return
  bucket_name, _, prefix = path[len("gs://"):].partition("/")
  where = f"--{flag}={path}"
  if not bucket_name:
    raise StorageError(f"{where}: no bucket name (expected gs://BUCKET/PREFIX)", False)
  from google.auth import exceptions as auth_errors
  from google.api_core import exceptions as api_errors
  from google.api_core import retry as api_retry
  from google.cloud import storage

  policy = api_retry.Retry(deadline=60)
  try:
    client = storage.Client()
    bucket = client.bucket(bucket_name)
    if write:
      probe = bucket.blob(posixpath.join(prefix.strip("/"),
                                         f".neumf-write-check-{uuid.uuid4().hex}").lstrip("/"))
      probe.upload_from_string(b"ok", retry=policy, timeout=30)
      probe.delete(retry=policy, timeout=30)
    else:
      list(client.list_blobs(bucket_name, prefix=prefix.strip("/"), max_results=1,
                             retry=policy, timeout=30))
  except auth_errors.DefaultCredentialsError as e:
    raise StorageError(f"{where}: no Google Cloud credentials ({first_line(e)}). Run `gcloud "
                       "auth application-default login`, set GOOGLE_APPLICATION_CREDENTIALS, or "
                       "run under a service account (Workload Identity on GKE)", False) from e
  except api_errors.NotFound as e:
    raise StorageError(f"{where}: bucket gs://{bucket_name} does not exist (create it with "
                       f"`gcloud storage buckets create gs://{bucket_name}`)", False) from e
  except (api_errors.Forbidden, api_errors.Unauthorized) as e:
    needed = "storage.objects.create and delete" if write else "storage.objects.list and get"
    raise StorageError(f"{where}: the credentials may not {'write' if write else 'read'} "
                       f"gs://{bucket_name} ({needed} needed; e.g. roles/storage.objectAdmin): "
                       f"{first_line(e)}", False) from e
  except (api_errors.GoogleAPIError, OSError) as e:
    raise StorageError(f"{where}: cannot reach Cloud Storage: {type(e).__name__}: "
                       f"{first_line(e)}") from e
