"""Free TCP ports on 127.0.0.1, for a cluster of local processes (the local debug script,
the cluster tests and benchmarks). Imports no TensorFlow, so a shell script can ask first:

  python -m trainer.localhost 3     # prints three free ports, space-separated
"""

import socket
import sys
from typing import List


def free_ports(n: int) -> List[int]:
  """`n` distinct ports free now: bound together (so the system hands out distinct ones),
  then released for the tasks to bind; another process could still take one in between."""
  sockets = [socket.socket() for _ in range(n)]
  try:
    for s in sockets:
      s.bind(("127.0.0.1", 0))
    return [s.getsockname()[1] for s in sockets]
  finally:
    for s in sockets:
      s.close()


if __name__ == "__main__":
  print(" ".join(str(port) for port in free_ports(int(sys.argv[1]))))
