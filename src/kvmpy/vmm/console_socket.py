"""The console on a Unix socket: kvmpy listens, one client at a time is the terminal.

``--serial unix:PATH`` makes PATH a listening socket and waits for the first
client before the guest starts, so nothing the guest says is lost (QEMU's
``-serial unix:PATH,server`` does the same). The client's bytes are the console
input; the guest's output goes to it, and is dropped, not fatal, once it has
hung up. The socket file is removed at exit.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import sys
from pathlib import Path

from kvmpy.errors import HostError


class SocketSink:
    """A write-only file-like view of the client connection for :class:`ConsoleOutput`.

    It is written from the console's writer thread, never a vCPU thread: a client that
    stops reading blocks only that thread, and the guest's further output is dropped
    (counted in ``ConsoleOutput.dropped``) until the client reads again or hangs up.
    """

    def __init__(self, connection: socket.socket) -> None:
        self._connection = connection
        self.hung_up = False

    def write(self, data: bytes) -> int:
        if not self.hung_up:
            try:
                self._connection.sendall(data)
            except OSError:  # the client went away: the guest goes on, its output is dropped
                self.hung_up = True
        return len(data)

    def flush(self) -> None:
        pass


class ConsoleSocket:
    """A listening Unix socket at ``path`` and, after :meth:`accept`, its one client."""

    def __init__(self, path: Path) -> None:
        self.path = path
        _remove_stale_socket(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(path))
            self._listener.listen(1)
        except OSError as error:
            self._listener.close()
            raise HostError(f"cannot listen on console socket {path}: {error.strerror}") from None
        self._connection: socket.socket | None = None

    def accept(self) -> tuple[SocketSink, int]:
        """Wait for the client; returns the output sink and the input descriptor."""
        print(f"kvmpy: waiting for a console client on {self.path}", file=sys.stderr, flush=True)
        self._connection, _ = self._listener.accept()
        return SocketSink(self._connection), self._connection.fileno()

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(OSError):
                self._connection.shutdown(socket.SHUT_RDWR)
            self._connection.close()
        self._listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _remove_stale_socket(path: Path) -> None:
    """A socket left by an earlier run is replaced; any other file is not ours to delete."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise HostError(f"console socket path {path} exists and is not a socket")
    path.unlink()


__all__ = ["ConsoleSocket", "SocketSink"]
