"""A virtio device's one lock, and the guarded call its back-end entry points go through.

Every thread that reaches a virtio device takes the same lock first: a vCPU
thread dispatching a BAR 0 access (configuration, a notify write that exited,
the status write that resets the device), the event loop running a queue
notification from an ioeventfd or a back-end handler (virtio-net's tap), and
the console input thread. So a reset never overtakes a request in flight, and
one queue is never walked by two threads at once. The lock is re-entrant: a
notification raises an interrupt, or marks the device broken, through the
transport, which takes it again.

A back-end entry point that is not a transport call (the tap became readable,
host input arrived) runs through :meth:`DeviceGuard.run`, which holds the lock
and turns a :class:`GuestError` into the transport's "needs reset" path, the
same containment a notification gets.

Lock order (the one place it is written down):

1. a virtio device's lock (``DeviceGuard.lock``, shared by its transport and model);
2. taken while holding it, never the other way round: the device's MSI-X table lock,
   the MSI router lock, the PCI INTx lock, the event loop's registration lock (a tap
   watched or unwatched), the console output's buffer lock;
3. none of those takes a device lock, and bus lookups take no lock at all (their
   tables are immutable and swapped whole; only writers of one bus serialise, on the
   bus's own lock, which is never held while calling a device).

Two device locks are never held at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from kvmpy.errors import GuestError

_T = TypeVar("_T")


class DeviceGuard:
    """The lock of one virtio device and where its guest errors go."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._on_guest_error: Callable[[str], None] | None = None

    def bind(self, on_guest_error: Callable[[str], None]) -> None:
        """The transport's "mark the device as needing reset" (called with the lock held)."""
        self._on_guest_error = on_guest_error

    def run(self, work: Callable[[], _T]) -> _T | None:
        """``work()`` under the device's lock; a guest error marks the device broken (None returned).

        Unbound (a device model tested without a transport) the error propagates.
        """
        with self.lock:
            try:
                return work()
            except GuestError as error:
                if self._on_guest_error is None:
                    raise
                self._on_guest_error(str(error))
                return None


__all__ = ["DeviceGuard"]
