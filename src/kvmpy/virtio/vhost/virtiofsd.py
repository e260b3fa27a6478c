"""virtiofsd, started and stopped by kvmpy, sharing one host directory as a virtio-fs back end.

QEMU 7.2's C virtiofsd (Debian ships it as /usr/lib/qemu/virtiofsd) serves
FUSE requests from the guest's virtio-fs queues on the files of one
directory. kvmpy runs it in the foreground (``-f``) on a socket in a private
directory, sandboxed in that directory (``sandbox=namespace``: mount, pid
and net namespaces and pivot_root, which needs root), and stops it with the
VM (:mod:`kvmpy.virtio.vhost.daemon_process`).

virtiofsd 7.2 has no read-only mode: a share it serves is writable by the
guest wherever the host's permissions allow, so kvmpy refuses ``readonly=on``
rather than pretend.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvmpy.errors import ConfigError
from kvmpy.virtio.vhost.daemon_process import DaemonProcess

BINARY = Path("/usr/lib/qemu/virtiofsd")
SANDBOXES = ("namespace", "chroot")


def virtiofsd_arguments(directory: Path, socket: Path, *, sandbox: str = "namespace") -> list[str]:
    """The command line: foreground, the socket, the shared directory and its sandbox."""
    return [
        str(BINARY),
        "-f",
        f"--socket-path={socket}",
        "-o",
        f"source={_escape(str(directory))}",
        "-o",
        "cache=auto",
        "-o",
        f"sandbox={sandbox}",
    ]


def _escape(value: str) -> str:
    """virtiofsd splits ``-o`` at commas; a backslash keeps one (and itself) in a value."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


class Virtiofsd(DaemonProcess):
    """One running virtiofsd sharing ``directory``; :attr:`socket` is where it listens."""

    def __init__(self, directory: Path, *, sandbox: str = "namespace") -> None:
        if not os.access(BINARY, os.X_OK):
            raise ConfigError(f"{BINARY} is not installed: it comes with Debian's qemu-system-common")
        if not directory.is_dir():
            raise ConfigError(f"shared directory {directory} is not a directory")
        if sandbox not in SANDBOXES:
            raise ConfigError(f"virtiofsd sandbox {sandbox!r} is not namespace or chroot")
        super().__init__(f"virtiofsd for {directory}", "fs.sock")
        self.directory = directory
        self._start(virtiofsd_arguments(directory, self.socket, sandbox=sandbox))


__all__ = ["BINARY", "SANDBOXES", "Virtiofsd", "virtiofsd_arguments"]
