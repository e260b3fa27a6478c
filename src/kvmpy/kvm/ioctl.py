"""One function that issues ioctls and turns failures into :class:`KvmError`.

Integer arguments go through libc's ``ioctl`` via ctypes (``fcntl.ioctl``
takes only a C int, too small for addresses such as the TSS base); buffer
arguments go through ``fcntl.ioctl`` with a mutable buffer, which passes the
caller's memory to the kernel without the 1024-byte copy limit that applies
to immutable arguments. Both release the GIL while the kernel works.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl

from kvmpy.kvm.errors import KvmError

Buffer = ctypes.Structure | ctypes.Union | ctypes.Array | ctypes.c_uint64 | bytearray  # type: ignore[type-arg]

_libc = ctypes.CDLL(None, use_errno=True)
#: Raw libc ioctl with an integer argument; returns -1 and sets errno on failure,
#: and never retries on EINTR (which is what lets a signal stop KVM_RUN).
libc_ioctl = _libc.ioctl
libc_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
libc_ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: int | Buffer = 0, *, name: str) -> int:
    """Issue ``request`` on ``fd``; returns the kernel's (non-negative) result.

    ``arg`` is an int (passed by value) or a mutable buffer (passed by
    pointer; the kernel may write into it). ``name`` names the ioctl in errors.
    """
    if isinstance(arg, int):
        while True:
            result = libc_ioctl(fd, request, arg)
            if result >= 0:
                return int(result)
            error = ctypes.get_errno()
            if error != errno.EINTR:
                raise KvmError(name, error)
    try:
        return fcntl.ioctl(fd, request, arg, True)  # type: ignore[call-overload,no-any-return]
    except OSError as error:
        raise KvmError(name, error.errno or 0) from None


__all__ = ["ioctl", "libc_ioctl"]
