"""A device's rate limiter at work: when to wait, and the retry that ends the wait.

A throttled queue is left alone (its chains stay in the ring, the guest's
further kicks change nothing) until a timer the VMM runs on the event loop
calls the device back: never a spin, never a sleep on a device thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from kvmpy.virtio.token_bucket import Cost, RateLimiter, retry_delay

#: Runs ``callback`` once, ``delay`` seconds from now, on the event loop (the VMM provides it).
Schedule = Callable[[float, Callable[[], None]], None]


class Throttle:
    """One rate limiter of a device (virtio-blk's, virtio-net's receive or transmit side, ...)."""

    def __init__(
        self,
        limiter: RateLimiter,
        schedule: Schedule,
        *,
        clock: Callable[[], float] = time.monotonic,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.limiter = limiter
        self._schedule = schedule
        self._clock = clock
        self._close = close
        self._waiting = False
        #: How many times a queue had to wait (the throttled-requests counter).
        self.throttled = 0

    def blocked(self, retry: Callable[[], None]) -> bool:
        """Whether the next request must wait; if so ``retry`` is scheduled for when it may go.

        A request may go while both buckets hold a token; its cost is charged after it
        (:meth:`spend`), so sizes known only afterwards (a received packet) count too.
        """
        if self._waiting:
            return True
        delay = self.limiter.wait(Cost(1, 1), self._clock())
        if delay == 0.0:
            return False
        self.throttled += 1
        self._waiting = True
        self._schedule(retry_delay(delay), lambda: self._retry(retry))
        return True

    def _retry(self, retry: Callable[[], None]) -> None:
        self._waiting = False
        retry()

    def spend(self, size: int) -> None:
        """Charge one request of ``size`` bytes."""
        self.limiter.spend(Cost(size), self._clock())

    def close(self) -> None:
        if self._close is not None:
            self._close()


__all__ = ["Schedule", "Throttle"]
