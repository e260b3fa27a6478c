"""The lab's end of a guest's TCP sends: what each connection carried, checksummed.

Runs in the lab next to the VM (``python -m kvmpy.lab.tcp_sink ADDRESS PORT OUT``) and
accepts any number of connections at once (a guest may send several streams in
parallel). Each connection becomes one line in OUT when it ends:
``RECEIVED <md5> <bytes> <how>``, where how is ``closed`` (the guest shut its side
down), ``reset``, ``stalled`` (nothing for :data:`IDLE_SECONDS`) or ``open`` (still
open when the sink was told to stop with SIGTERM). A transfer that broke shows up as a
short count or a wrong checksum, never as a missing line.
"""

from __future__ import annotations

import hashlib
import signal
import socket
import sys
import threading
from pathlib import Path
from types import FrameType

CHUNK = 1 << 16
#: A connection silent this long is recorded as stalled (a guest whose transmit queue broke
#: sends nothing more and never closes).
IDLE_SECONDS = 60.0


class Sink:
    """Connections in progress and the file their results go to."""

    def __init__(self, out: Path) -> None:
        self._out = out
        self._lock = threading.Lock()
        self._open: dict[int, tuple[hashlib._Hash, int]] = {}

    def receive(self, connection: socket.socket) -> None:
        """Read ``connection`` to its end and record what came."""
        key, digest, count, how = id(connection), hashlib.md5(), 0, "closed"
        connection.settimeout(IDLE_SECONDS)
        with connection:
            try:
                while data := connection.recv(CHUNK):
                    digest.update(data)
                    count += len(data)
                    with self._lock:
                        self._open[key] = (digest, count)
            except TimeoutError:
                how = "stalled"
            except OSError:
                how = "reset"
        with self._lock:
            self._open.pop(key, None)
            self._record(digest.hexdigest(), count, how)

    def stop(self) -> None:
        """Record the connections still open (the VM is gone) and end the process."""
        with self._lock:
            for digest, count in self._open.values():
                self._record(digest.hexdigest(), count, "open")
        sys.exit(0)

    def _record(self, md5: str, count: int, how: str) -> None:
        with self._out.open("a") as handle:
            handle.write(f"RECEIVED {md5} {count} {how}\n")


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m kvmpy.lab.tcp_sink ADDRESS PORT OUT", file=sys.stderr)
        return 2
    address, port, out = argv[0], int(argv[1]), Path(argv[2])
    sink = Sink(out)

    def on_term(_signal: int, _frame: FrameType | None) -> None:
        sink.stop()

    signal.signal(signal.SIGTERM, on_term)
    listener = socket.create_server((address, port), reuse_port=True)
    print(f"tcp_sink: listening on {address}:{port}", flush=True)
    while True:
        connection, peer = listener.accept()
        print(f"tcp_sink: connection from {peer[0]}:{peer[1]}", flush=True)
        threading.Thread(target=sink.receive, args=(connection,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
