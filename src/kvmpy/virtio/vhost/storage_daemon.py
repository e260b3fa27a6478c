"""qemu-storage-daemon, started and stopped by kvmpy, exporting one image as vhost-user-blk.

QEMU's block layer in a process of its own (raw and qcow2 images, O_DIRECT, io_uring)
serves a disk's virtqueues; kvmpy starts it on a socket in a private directory, waits
until it listens, and stops it with the VM (:mod:`kvmpy.virtio.vhost.daemon_process`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from kvmpy.errors import ConfigError
from kvmpy.virtio.vhost.daemon_process import DaemonProcess

DAEMON = "qemu-storage-daemon"
QCOW2_MAGIC = b"QFI\xfb"
FORMATS = ("raw", "qcow2")
AIO_MODES = ("threads", "native", "io_uring")


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


class StorageDaemon(DaemonProcess):
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
        super().__init__(f"{DAEMON} for {image}", "blk.sock")
        self.image = image
        arguments = daemon_arguments(
            image, self.socket, fmt=fmt, read_only=read_only, direct=direct, aio=aio, queues=queues
        )
        arguments[0] = binary
        self._start(arguments)


__all__ = ["AIO_MODES", "FORMATS", "StorageDaemon", "daemon_arguments", "image_format"]
