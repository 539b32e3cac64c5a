"""The errors the command lines turn into exit codes, one type per kind of failure.

A command line exits with `error.exit_code` of the type it caught: 2 for what a person must fix
(a flag, an input file, a missing bucket), 3 for a run that diverged (restarting it repeats it:
change the learning rate or the data), and a code of 128 or more for what a restart may cure
(Kubeflow's ExitCode restart policy retries 128-255 and treats 1-127 as permanent). Free of
TensorFlow, so flag parsing can raise them before TensorFlow loads.
"""

# Exit codes of the command lines.
USAGE_EXIT_CODE = 2  # bad flags or input: fix the command
DIVERGED_EXIT_CODE = 3  # training diverged (non-finite loss, weights or metrics): nothing shipped
LOST_PEER_EXIT_CODE = 131  # another task of the cluster was lost: restart every task
STORAGE_EXIT_CODE = 132  # storage unreachable after retries: restart once it is back

RESUME_HINT = ("Restart with the same command (every task, in a cluster): training resumes "
               "from the latest checkpoint.")


class TrainerError(Exception):
  """A failure the command lines report in one line and exit with `exit_code`."""

  exit_code = 1


class ConfigError(TrainerError, ValueError):
  """A configuration value is invalid; the message names the flag and the value."""

  exit_code = USAGE_EXIT_CODE


class StorageError(TrainerError, RuntimeError):
  """Storage failed after retries, or a bucket is missing or not usable; says what and where.

  `retryable`: whether running again later may succeed (storage was unreachable), as opposed
  to a missing bucket or permission that needs a person.
  """

  def __init__(self, message: str, retryable: bool = True):
    super().__init__(message)
    self.retryable = retryable

  @property
  def exit_code(self) -> int:
    """STORAGE_EXIT_CODE, or USAGE_EXIT_CODE (fix the command) when retrying cannot help."""
    return STORAGE_EXIT_CODE if self.retryable else USAGE_EXIT_CODE


class LostPeerError(TrainerError, RuntimeError):
  """Another task of the cluster stopped answering (its collective failed or timed out)."""

  exit_code = LOST_PEER_EXIT_CODE


class DivergedError(TrainerError, ArithmeticError):
  """Training diverged: a loss, weight or eval metric is NaN or infinite. The run stopped with
  its latest checkpoint the last finite one, exported nothing and wrote no metrics.json."""

  exit_code = DIVERGED_EXIT_CODE
