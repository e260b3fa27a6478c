"""The host end of the lab's network benchmarks: a sink, a source and an echo server.

Runs in the lab next to the VM (``python -m kvmpy.bench.net_peer ADDRESS``):
port 5001 swallows everything and answers one byte when the guest has shut
down its side, port 5002 sends until the guest closes, port 5003 echoes.
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable

SINK_PORT, SOURCE_PORT, ECHO_PORT = 5001, 5002, 5003
CHUNK = 1 << 20


def _sink(connection: socket.socket) -> None:
    while connection.recv(CHUNK):
        pass
    connection.sendall(b"k")


def _source(connection: socket.socket) -> None:
    payload = bytes(CHUNK)
    try:
        while True:
            connection.sendall(payload)
    except OSError:  # the guest has read what it wanted and closed
        pass


def _echo(connection: socket.socket) -> None:
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := connection.recv(4096):
        connection.sendall(data)


def _serve(address: str, port: int, handler: Callable[[socket.socket], None]) -> None:
    """Each connection in a thread of its own: a guest may run streams in parallel."""
    listener = socket.create_server((address, port), reuse_port=True)
    while True:
        connection, _ = listener.accept()
        threading.Thread(target=_handle, args=(handler, connection), daemon=True).start()


def _handle(handler: Callable[[socket.socket], None], connection: socket.socket) -> None:
    with connection:
        handler(connection)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m kvmpy.bench.net_peer ADDRESS", file=sys.stderr)
        return 2
    handlers = ((SINK_PORT, _sink), (SOURCE_PORT, _source), (ECHO_PORT, _echo))
    threads = [threading.Thread(target=_serve, args=(argv[0], port, handler)) for port, handler in handlers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
