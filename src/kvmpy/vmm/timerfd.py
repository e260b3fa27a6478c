"""A one-shot timer the device event loop runs: a timerfd (the kernel keeps time, no thread).

Python before 3.13 has no ``os.timerfd_create``, so it is called through
ctypes. The timer's descriptor is watched by the event loop like any other;
when it fires, the loop calls the callback the timer was last armed with.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable

from kvmpy.errors import HostError

CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_LIBC = ctypes.CDLL(None, use_errno=True)


class TimerFd:
    """One timer on the event loop: ``schedule(delay, callback)`` replaces any earlier arming."""

    def __init__(self, watch: Callable[[int, Callable[[], None]], None]) -> None:
        fd = _LIBC.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            raise HostError(f"timerfd_create failed: {os.strerror(ctypes.get_errno())}")
        self.fd: int = fd
        self._callback: Callable[[], None] | None = None
        watch(self.fd, self._expired)

    def schedule(self, delay: float, callback: Callable[[], None]) -> None:
        self._callback = callback
        whole = int(delay)
        nanoseconds = max(int((delay - whole) * 1e9), 1 if whole == 0 else 0)  # 0/0 would disarm
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(whole, nanoseconds))
        if _LIBC.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            raise HostError(f"timerfd_settime failed: {os.strerror(ctypes.get_errno())}")

    def _expired(self) -> None:
        try:
            os.read(self.fd, 8)  # the expiry count; reading it stops the descriptor being readable
        except BlockingIOError:
            return
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()

    def close(self) -> None:
        os.close(self.fd)


__all__ = ["TimerFd"]
