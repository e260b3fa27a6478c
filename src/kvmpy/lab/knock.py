"""Knock on a guest's TCP port until it answers: the lab's "go on" to a guest that waits for it.

``python -m kvmpy.lab.knock HOST PORT SECONDS`` connects to HOST:PORT, trying again
every half second for up to SECONDS, and closes the connection at once; the exit
status says whether anyone answered. A guest that blocks in ``nc -l -p PORT`` goes
on when the knock arrives, so a lab scenario can hold a guest's workload at a point
until the host has done something to the VM (a snapshot, a migration, a restore),
however long the host's side takes under TCG.
"""

from __future__ import annotations

import socket
import sys
import time

RETRY_SECONDS = 0.5


def knock(host: str, port: int, seconds: float) -> bool:
    """Whether ``host:port`` accepted a connection within ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection((host, port), timeout=2.0).close()
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(RETRY_SECONDS)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m kvmpy.lab.knock HOST PORT SECONDS", file=sys.stderr)
        return 2
    host, port, seconds = argv[0], int(argv[1]), float(argv[2])
    if knock(host, port, seconds):
        return 0
    print(f"kvmpy.lab.knock: nobody answered on {host}:{port} within {seconds:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
