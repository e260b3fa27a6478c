"""virtiofsd, started and stopped by kvmpy, sharing one host directory as a virtio-fs back end.

QEMU 7.2's C virtiofsd (Debian ships it as /usr/lib/qemu/virtiofsd) serves
FUSE requests from the guest's virtio-fs queues on the files of one
directory. kvmpy runs it in the foreground (``-f``) on a socket in a private
directory, sandboxed in that directory (``sandbox=namespace``: mount, pid
and net namespaces and pivot_root, which needs root), and stops it with the
VM (:mod:`kvmpy.virtio.vhost.daemon_process`).

virtiofsd 7.2 has no read-only mode, so for ``readonly=on`` kvmpy gives it a
mount namespace of its own in which the directory is a read-only bind mount
of itself (before virtiofsd starts, in the child): the kernel then refuses
every write with EROFS, whatever virtiofsd is asked. The bind mount is not
recursive, so file systems mounted below the directory are not shared at all.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from kvmpy.errors import ConfigError
from kvmpy.virtio.vhost.daemon_process import DaemonProcess

BINARY = Path("/usr/lib/qemu/virtiofsd")
SANDBOXES = ("namespace", "chroot")
_CLONE_NEWNS = 0x20000
_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18


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

    def __init__(self, directory: Path, *, read_only: bool = False, sandbox: str = "namespace") -> None:
        if not os.access(BINARY, os.X_OK):
            raise ConfigError(f"{BINARY} is not installed: it comes with Debian's qemu-system-common")
        if not directory.is_dir():
            raise ConfigError(f"shared directory {directory} is not a directory")
        if sandbox not in SANDBOXES:
            raise ConfigError(f"virtiofsd sandbox {sandbox!r} is not namespace or chroot")
        super().__init__(f"virtiofsd for {directory}", "fs.sock")
        self.directory = directory
        self.read_only = read_only
        prepare = functools.partial(_read_only_view, os.fsencode(directory.resolve())) if read_only else None
        self._start(virtiofsd_arguments(directory, self.socket, sandbox=sandbox), prepare)


def _read_only_view(directory: bytes) -> None:
    """In the child before exec: a private mount namespace where ``directory`` is read-only."""
    libc = ctypes.CDLL(None, use_errno=True)
    steps = (
        ("unshare", lambda: libc.unshare(_CLONE_NEWNS)),
        ("make / private", lambda: libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None)),
        ("bind mount", lambda: libc.mount(directory, directory, None, _MS_BIND, None)),
        (
            "remount read-only",
            lambda: libc.mount(None, directory, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY, None),
        ),
    )
    for what, step in steps:
        if step() != 0:
            reason = os.strerror(ctypes.get_errno())
            os.write(
                2, f"kvmpy: read-only view of {os.fsdecode(directory)}: {what} failed: {reason}\n".encode()
            )
            os._exit(1)


__all__ = ["BINARY", "SANDBOXES", "Virtiofsd", "virtiofsd_arguments"]
