"""Eventfds, the counters KVM and the vhost back ends signal each other and kvmpy through.

Below every other layer: the event loop watches them, the PCI platform hands them to
KVM as ioeventfds and irqfds, and the vhost code gives them to back ends.
"""

from __future__ import annotations

import os


def drain(fd: int) -> None:
    """Reset a non-blocking eventfd's count (nothing to read is not an error)."""
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


class EventFd:
    """A non-blocking eventfd that handlers drain before doing their work."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def drain(self) -> None:
        drain(self.fd)

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        os.close(self.fd)


__all__ = ["EventFd", "drain"]
