"""One function that issues ioctls and turns failures into :class:`KvmError`.

``fcntl.ioctl`` releases the GIL while the kernel works (so ``KVM_RUN`` on one
vCPU thread does not stop the others) and, given a mutable buffer, passes the
caller's memory to the kernel without the 1024-byte copy limit that applies
to immutable arguments. Every ioctl in kvmpy goes through :func:`ioctl`.
"""

from __future__ import annotations

import ctypes
import fcntl

from kvmpy.kvm.errors import KvmError

Buffer = ctypes.Structure | ctypes.Union | ctypes.Array | bytearray  # type: ignore[type-arg]


def ioctl(fd: int, request: int, arg: int | Buffer = 0, *, name: str) -> int:
    """Issue ``request`` on ``fd``; returns the kernel's (non-negative) result.

    ``arg`` is an int (passed by value) or a mutable buffer (passed by
    pointer; the kernel may write into it). ``name`` names the ioctl in errors.
    """
    try:
        if isinstance(arg, int):
            return fcntl.ioctl(fd, request, arg)
        return fcntl.ioctl(fd, request, arg, True)  # type: ignore[call-overload]
    except InterruptedError:
        raise
    except OSError as error:
        raise KvmError(name, error.errno or 0) from None


__all__ = ["ioctl"]
