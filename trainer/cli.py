"""What the command lines share: flag errors exit with the usage code, not absl's 1.

absl's `app.run` reports a bad flag value and exits 1, which Kubeflow's ExitCode policy (and any
scheduler that reads exit codes) cannot tell from a crash; our command lines exit 2 for every
bad flag, as for any other bad input (`trainer.errors`). Free of TensorFlow.
"""

import sys
from typing import Callable, List

from absl import app, flags

from trainer import errors


def run(main: Callable[[List[str]], None], program: str) -> None:
  """`app.run(main)`, with a flag error printed as `<program>: error: ...` and exit code 2."""

  def parse(argv: List[str]) -> List[str]:
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      print(f"{program}: error: {e}\nPass --helpshort or --helpfull to see help on flags.",
            file=sys.stderr)
      sys.exit(errors.USAGE_EXIT_CODE)

  app.run(main, flags_parser=parse)
