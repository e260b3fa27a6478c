"""The API's Unix socket and its threads: :class:`ApiServer`.

``start()`` binds and listens before it returns, and imports nothing heavy to
do so: the HTTP and validation code (h11, msgspec, the actions) is loaded by
the server's own thread, while the first clients already wait in the listen
backlog. That is how ``GET /`` answers within 100 ms of process start even
though the rest of kvmpy takes longer to import (Firecracker's harness allows
1 s; its Go SDK polls every 10 ms).

Each client gets a daemon thread (at most ``MAX_CONNECTIONS`` at once), so a
slow or silent client never holds up another; their requests meet in
``submit``, which is thread-safe and serializes what the VMM does.
"""

from __future__ import annotations

import os
import socket
import stat
import threading

from kvmpy.errors import HostError

#: Not typing.TYPE_CHECKING: this module avoids even importing typing before bind() (mypy knows the name).
TYPE_CHECKING = False
if TYPE_CHECKING:  # the real imports happen on the server's thread, after bind()
    from collections.abc import Callable

    from kvmpy.api.connection import Connection
    from kvmpy.vmm.actions import Action

    Submit = Callable[[Action], object]

#: Clients served at once; one more is accepted and closed at once.
MAX_CONNECTIONS = 32
_BACKLOG = 64


class DeferredSubmit:
    """A ``submit`` that exists before the VMM does: calls wait until :meth:`attach`.

    It lets a process bind the API socket first and import and build its Vmm
    afterwards; a client that asks in between gets its answer when the VMM is there.
    """

    def __init__(self) -> None:
        self._ready = threading.Event()
        self._submit: Submit | None = None

    def attach(self, submit: Submit) -> None:
        self._submit = submit
        self._ready.set()

    def __call__(self, action: Action) -> object:
        self._ready.wait()
        assert self._submit is not None
        return self._submit(action)


class ApiServer:
    """Firecracker's API (and kvmpy's monitor) on the Unix socket ``path``."""

    def __init__(self, path: str | os.PathLike[str], submit: Submit, max_payload: int = 51200) -> None:
        self.path = os.fspath(path)
        self._submit = submit
        self._max_payload = max_payload
        self._listener: socket.socket | None = None
        self._inode = 0
        self._thread: threading.Thread | None = None
        self._clients: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closing = threading.Event()

    def start(self) -> None:
        """Bind and listen on ``path`` now; serve from a daemon thread.

        Raises HostError if the path is taken (as Firecracker does: a socket left
        behind is the user's to remove) or cannot be bound.
        """
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            listener.listen(_BACKLOG)
        except OSError as error:
            listener.close()
            raise HostError(
                f"Failed to open the API socket at: {self.path}. Check that it is not already used "
                f"({error.strerror})."
            ) from None
        self._listener = listener
        self._inode = os.stat(self.path).st_ino
        self._thread = threading.Thread(target=self._serve, name="kvmpy-api", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop accepting, end every connection, wait for the threads and remove the socket."""
        self._closing.set()
        if self._listener is not None:
            _shutdown(self._listener)  # wakes accept()
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            _shutdown(client)  # wakes recv()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
            self._remove_socket_file()
            self._listener = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _remove_socket_file(self) -> None:
        """Remove our socket, and never a file someone else put at the same path since."""
        try:
            info = os.lstat(self.path)
            if stat.S_ISSOCK(info.st_mode) and info.st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass

    def _serve(self) -> None:
        from kvmpy.api.connection import Connection
        from kvmpy.api.router import Router
        from kvmpy.jail import seccomp

        if seccomp.enabled():  # what requests import lazily, imported while files can be opened
            from kvmpy.api import parse, schemas  # noqa: F401
        seccomp.enter_role(seccomp.Role.API)  # the connection threads it starts inherit the filter

        router = Router(self._submit)
        assert self._listener is not None
        workers: list[threading.Thread] = []
        while not self._closing.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                break  # closed
            if not self._admit(client):
                continue
            connection = Connection(client, router.handle, self._max_payload)
            worker = threading.Thread(
                target=self._run_client, args=(client, connection), name="kvmpy-api-client", daemon=True
            )
            worker.start()
            workers = [w for w in workers if w.is_alive()] + [worker]
        for worker in workers:
            worker.join(timeout=5)

    def _admit(self, client: socket.socket) -> bool:
        with self._lock:
            if self._closing.is_set() or len(self._clients) >= MAX_CONNECTIONS:
                client.close()
                return False
            self._clients.add(client)
            return True

    def _run_client(self, client: socket.socket, connection: Connection) -> None:
        try:
            connection.serve()
        except Exception:  # a bug in one conversation must not reach the others
            import logging

            logging.getLogger("kvmpy.api").exception("API connection failed")
        finally:
            with self._lock:
                self._clients.discard(client)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its own thread


__all__ = ["MAX_CONNECTIONS", "ApiServer", "DeferredSubmit"]
