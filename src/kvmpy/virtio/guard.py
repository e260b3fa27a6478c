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

0. the machine's coalesced-ring lock, held while a vCPU thread replays the writes KVM
   buffered into their devices, comes before every device lock;
1. a device's lock: a virtio device's ``DeviceGuard.lock`` (shared by its transport and
   model) or a legacy device's own (the 16550A's); never two of them at once;
2. taken while holding one, never the other way round: the MSI-X table's lock, and
   inside it the MSI router's (a message is routed and sent with the table locked);
   the PCI INTx lock; the event loop's registration lock (a tap watched or unwatched,
   a notify area rewired); the console output's buffer lock;
3. none of those calls back into a device. The event loop holds no lock while it runs
   a handler, so a handler may take a device lock. Bus lookups take no lock at all
   (their tables are immutable and swapped whole); a bus's writer lock is held only
   while it swaps its table, never while calling a device.
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
