"""Errors from the KVM layer: which ioctl failed and why."""

from __future__ import annotations

import errno as errno_module
import os

from kvmpy.errors import HostError


class KvmError(HostError):
    """An ioctl on /dev/kvm, a VM or a vCPU failed."""

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        name = errno_module.errorcode.get(errno, str(errno))
        message = f"{ioctl} failed: {name} ({os.strerror(errno)})"
        if detail:
            message += f": {detail}"
        super().__init__(message)
        self.ioctl = ioctl
        self.errno = errno


class KvmUnavailableError(HostError):
    """/dev/kvm is missing or cannot be opened."""


__all__ = ["KvmError", "KvmUnavailableError"]
