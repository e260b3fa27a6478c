"""How the VFIO layer reaches the kernel: open a node, issue an ioctl.

Behind a two-method interface so the tests can put a fake kernel there (this host has no
/dev/vfio); everything else (pread/pwrite/mmap on the device fd) is plain file I/O that
works on the fake's memfd as on the real device fd.
"""

from __future__ import annotations

import os
from typing import Protocol

from kvmpy.kvm.ioctl import Buffer, ioctl


class VfioKernel(Protocol):
    """Opens VFIO nodes and issues ioctls on them; an ioctl failure raises KvmError."""

    def open(self, path: str) -> int: ...

    def ioctl(self, fd: int, request: int, arg: int | Buffer, name: str) -> int: ...


class KernelVfio:
    """The real kernel."""

    def open(self, path: str) -> int:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioctl(self, fd: int, request: int, arg: int | Buffer, name: str) -> int:
        return ioctl(fd, request, arg, name=name)


__all__ = ["KernelVfio", "VfioKernel"]
