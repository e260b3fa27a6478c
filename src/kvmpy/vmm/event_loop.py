"""The device event loop: one thread that waits on eventfds (epoll) and runs back ends.

Queue notifications arrive here through ioeventfds, so the vCPU that kicked
a queue goes straight back into the guest while this thread does the I/O.

Pausing the VM quiesces this loop: ``pause()`` returns once the handler that
was running (if any) has finished and the loop waits, so no request is in
flight and no device raises an interrupt until ``resume()``. Events that
arrive meanwhile stay pending in their eventfds (epoll is level-triggered)
and are handled after the resume.

A handler that raises is contained here (the VM goes on); one that keeps
raising is disabled instead of being called again for the same readable fd
thousands of times a second.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable

from kvmpy.eventfd import EventFd, drain
from kvmpy.jail.seccomp import Role, enter_role

log = logging.getLogger("kvmpy.events")

#: A handler that fails this many times in a row is unregistered: its fd stays readable
#: (level-triggered epoll), so keeping it would spin a host core on the same failure.
MAX_CONSECUTIVE_FAILURES = 8
#: How long ``pause()`` waits for the running handler to finish.
PAUSE_TIMEOUT = 5.0


class EventLoop(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="device-events", daemon=True)
        self._epoll = select.epoll()
        self._handlers: dict[int, Callable[[], None]] = {}
        self._failures: dict[int, int] = {}
        self._lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._stopping = False
        self._pause_requested = False
        self._paused = threading.Event()
        self._resumed = threading.Event()
        #: Handlers disabled after failing again and again (fd -> count), for reports.
        self.disabled: dict[int, int] = {}

    def add(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler`` in this thread whenever ``fd`` becomes readable."""
        with self._lock:
            self._handlers[fd] = handler
            self._failures.pop(fd, None)
            self._epoll.register(fd, select.EPOLLIN)

    def remove(self, fd: int) -> None:
        """Stop watching ``fd`` (a device closing after the loop has stopped only forgets it)."""
        with self._lock:
            if self._handlers.pop(fd, None) is not None and not self._epoll.closed:
                self._epoll.unregister(fd)

    def pause(self) -> None:
        """Return once no handler runs and none will until ``resume()`` (idempotent)."""
        if not self.is_alive():
            return
        self._resumed.clear()
        self._pause_requested = True
        os.eventfd_write(self._wake_fd, 1)
        if threading.current_thread() is not self and not self._paused.wait(PAUSE_TIMEOUT):
            log.warning("device event loop did not pause within %.0f s (a handler is stuck)", PAUSE_TIMEOUT)

    def resume(self) -> None:
        self._pause_requested = False
        self._resumed.set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def stop(self) -> None:
        """Stop the thread (if it runs) and close the loop's descriptors (idempotent)."""
        if self._epoll.closed:
            return
        self._stopping = True
        self.resume()
        os.eventfd_write(self._wake_fd, 1)
        if self.is_alive():
            self.join(1.0)
        self._epoll.close()
        os.close(self._wake_fd)

    def run(self) -> None:
        enter_role(Role.EVENT_LOOP)
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except (OSError, ValueError):
                return
            for fd, _ in events:
                if self._pause_requested:
                    self._wait_while_paused()
                    break  # poll again: what was ready may have changed
                if fd == self._wake_fd:
                    drain(fd)
                    continue
                self._dispatch(fd)

    def _wait_while_paused(self) -> None:
        self._paused.set()
        while self._pause_requested and not self._stopping:
            self._resumed.wait(0.5)
        self._paused.clear()

    def _dispatch(self, fd: int) -> None:
        handler = self._handlers.get(fd)
        if handler is None:
            return
        try:
            handler()
        except Exception:  # a back-end bug must not kill every device
            failures = self._failures.get(fd, 0) + 1
            self._failures[fd] = failures
            if failures == 1:
                log.exception("device event handler for fd %d failed", fd)
            if failures >= MAX_CONSECUTIVE_FAILURES:
                log.error("device event handler for fd %d failed %d times in a row: disabled", fd, failures)
                self.disabled[fd] = failures
                self.remove(fd)
        else:
            if fd in self._failures:
                del self._failures[fd]


__all__ = ["EventFd", "EventLoop"]
