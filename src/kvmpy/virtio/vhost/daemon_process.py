"""A vhost-user back-end program kvmpy starts and stops with the VM (qemu-storage-daemon, virtiofsd).

Each runs in a private temporary directory that holds its socket and its log
(stdout and stderr). kvmpy waits until the socket listens; if the program
exits first, the last line it wrote is the error. The program gets SIGTERM
when kvmpy dies (PR_SET_PDEATHSIG), so none outlives its VMM; :meth:`stop`
sends SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT` seconds, and removes
the directory.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvmpy.errors import HostError

#: Seconds a daemon has to start listening.
START_TIMEOUT = 10.0
#: Seconds a daemon has to exit after SIGTERM before it gets SIGKILL.
STOP_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1
_SO_ACCEPTCON = 0x10000


class DaemonProcess:
    """One back-end program: a subclass builds its command line and calls :meth:`_start`."""

    def __init__(self, what: str, socket_name: str) -> None:
        #: What the daemon is, for messages ("virtiofsd for /srv/share").
        self.what = what
        self._directory = Path(tempfile.mkdtemp(prefix="kvmpy-vhost-user-"))
        self.socket = self._directory / socket_name
        self.log = self._directory / "daemon.log"
        self._process: subprocess.Popen[bytes] | None = None

    def _start(self, arguments: list[str], prepare: Callable[[], None] | None = None) -> None:
        """Run ``arguments`` and wait until :attr:`socket` exists (stopped again on failure).

        ``prepare`` runs in the child before the program (after fork, so it must not take
        locks); it reports a failure on stderr and exits, which then ends :meth:`_start`.
        """

        def before_exec() -> None:
            _die_with_parent()
            if prepare is not None:
                prepare()

        try:
            with self.log.open("wb") as log:
                self._process = subprocess.Popen(
                    arguments,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    preexec_fn=before_exec,
                    close_fds=True,
                )
            self._wait_listening(self._process)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self._process.pid if self._process is not None else -1

    def _wait_listening(self, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not _listening(self.socket):
            if process.poll() is not None:
                raise HostError(f"{self.what} did not start: {self._last_words(process)}")
            if time.monotonic() > deadline:
                raise HostError(f"{self.what} did not listen within {START_TIMEOUT:g} s")
            time.sleep(0.005)

    def _last_words(self, process: subprocess.Popen[bytes]) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else f"exit status {process.returncode}"

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """SIGTERM (the daemon finishes cleanly), SIGKILL if it lingers; then the directory goes."""
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        shutil.rmtree(self._directory, ignore_errors=True)


def _listening(socket: Path) -> bool:
    """Whether the socket bound at ``socket`` takes connections yet. A daemon binds, then
    listens, and a connection between the two is refused; /proc/net/unix marks a listening
    socket with __SO_ACCEPTCON in its flags."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return socket.exists()
    path = str(socket)
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7] == path and int(fields[3], 16) & _SO_ACCEPTCON:
            return True
    return False


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


__all__ = ["START_TIMEOUT", "STOP_TIMEOUT", "DaemonProcess"]
