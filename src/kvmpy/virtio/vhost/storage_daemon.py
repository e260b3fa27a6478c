"""qemu-storage-daemon, started and stopped by kvmpy, exporting one image as vhost-user-blk.

QEMU's block layer in a process of its own (raw and qcow2 images, O_DIRECT, io_uring)
serves a disk's virtqueues; kvmpy starts it on a socket in a private directory, waits
until it listens, and stops it with the VM. The daemon gets SIGTERM if kvmpy dies
(PR_SET_PDEATHSIG), so no daemon outlives its VMM. What it says on stderr goes to a
file next to its socket, and its last line is the error when it fails to start.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from kvmpy.errors import ConfigError, HostError

DAEMON = "qemu-storage-daemon"
#: Seconds the daemon has to start listening.
START_TIMEOUT = 10.0
QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("raw", "qcow2")
AIO_MODES = ("threads", "native", "io_uring")
_PR_SET_PDEATHSIG = 1


def image_format(path: Path) -> str:
    """qcow2 if the image starts with its magic number, else raw."""
    try:
        with path.open("rb") as image:
            return "qcow2" if image.read(4) == QCOW2_MAGIC else "raw"
    except OSError as error:
        raise ConfigError(f"disk {path} cannot be read: {error.strerror}") from None


def daemon_arguments(
    image: Path, socket: Path, *, fmt: str, read_only: bool, direct: bool, aio: str, queues: int
) -> list[str]:
    """The command line: a file node, a format node on it, and the export."""
    file_node = f"driver=file,filename={_escape(str(image))},node-name=file0,cache.direct={_on(direct)}"
    if aio:
        file_node += f",aio={aio}"
    if read_only:
        file_node += ",read-only=on"
    format_node = f"driver={fmt},file=file0,node-name=disk0,read-only={_on(read_only)}"
    export = (
        f"type=vhost-user-blk,id=export0,node-name=disk0,addr.type=unix,addr.path={_escape(str(socket))},"
        f"writable={_on(not read_only)},num-queues={queues}"
    )
    return [DAEMON, "--blockdev", file_node, "--blockdev", format_node, "--export", export]


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _escape(value: str) -> str:
    """QEMU's option syntax doubles a comma inside a value."""
    return value.replace(",", ",,")


class StorageDaemon:
    """One running qemu-storage-daemon; :attr:`socket` is where it listens."""

    def __init__(
        self,
        image: Path,
        *,
        fmt: str = "",
        read_only: bool = False,
        direct: bool = False,
        aio: str = "",
        queues: int = 1,
    ) -> None:
        binary = shutil.which(DAEMON)
        if binary is None:
            raise ConfigError(
                f"{DAEMON} is not installed: it comes with Debian's qemu-system-common (scripts/setup)"
            )
        fmt = fmt or image_format(image)
        if fmt not in FORMATS:
            raise ConfigError(f"disk {image}: format {fmt!r} is not raw or qcow2")
        if aio and aio not in AIO_MODES:
            raise ConfigError(f"disk {image}: aio={aio} is not threads, native or io_uring")
        self._directory = Path(tempfile.mkdtemp(prefix="kvmpy-vhost-user-"))
        self.socket = self._directory / "blk.sock"
        self.log = self._directory / "daemon.log"
        arguments = daemon_arguments(
            image, self.socket, fmt=fmt, read_only=read_only, direct=direct, aio=aio, queues=queues
        )
        arguments[0] = binary
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                arguments,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
                close_fds=True,
            )
        self.image = image
        try:
            self._wait_listening()
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self._process.pid

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self.socket.exists():
            if self._process.poll() is not None:
                raise HostError(f"{DAEMON} for {self.image} did not start: {self._last_words()}")
            if time.monotonic() > deadline:
                raise HostError(f"{DAEMON} for {self.image} did not listen within {START_TIMEOUT:g} s")
            time.sleep(0.005)

    def _last_words(self) -> str:
        try:
            lines = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return lines[-1] if lines else f"exit status {self._process.returncode}"

    def running(self) -> bool:
        return self._process.poll() is None

    def stop(self) -> None:
        """SIGTERM (the daemon flushes and exits), SIGKILL after 5 s; then the directory goes."""
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._directory, ignore_errors=True)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it ends."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


__all__ = ["AIO_MODES", "FORMATS", "StorageDaemon", "daemon_arguments", "image_format"]
