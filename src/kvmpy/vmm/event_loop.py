"""The device event loop: one thread that waits on eventfds (epoll) and runs back ends.

Queue notifications arrive here through ioeventfds, so the vCPU that kicked
a queue goes straight back into the guest while this thread does the I/O.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

log = logging.getLogger("kvmpy.events")


class EventLoop(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="device-events", daemon=True)
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._stopping = False

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler`` in this thread whenever ``fd`` becomes readable."""
        with self._lock:
            self._handlers[fd] = handler
            self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        with self._lock:
            if self._handlers.pop(fd, None) is not None:
                self._epoll.unregister(fd)

    def stop(self) -> None:
        self._stopping = True
        os.eventfd_write(self._wake_fd, 1)
        if self.is_alive():
            self.join(1.0)
        self._epoll.close()
        os.close(self._wake_fd)

    def run(self) -> None:
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except (OSError, ValueError):
                return
            for fd, _ in events:
                if fd == self._wake_fd:
                    continue
                handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler()
                except Exception:  # a back end bug must not kill every device
                    log.exception("device event handler failed")


class EventFd:
    """A non-blocking eventfd that handlers drain before doing their work."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def drain(self) -> None:
        try:
            os.eventfd_read(self.fd)
        except BlockingIOError:
            pass

    def signal(self) -> None:
        os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        os.close(self.fd)


__all__ = ["EventFd", "EventLoop"]
