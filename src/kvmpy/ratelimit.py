"""One rate limiter for everything a guest can make kvmpy log.

A hostile guest can trigger the same complaint millions of times a second.
Every such message goes through :data:`guest_log`: each key (a device and
what went wrong) logs its first few occurrences, then at most one line per
period saying how many were suppressed meanwhile. The counts themselves
live in metrics, not in the log.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable

#: Lines per key before the limiter starts summarising.
BURST = 3
#: After the burst, one line per key per this many seconds.
PERIOD_SECONDS = 10.0
#: Keys remembered; past this, new keys share one bucket (a guest could invent keys forever).
MAX_KEYS = 1024


class RateLimitedLog:
    def __init__(
        self, burst: int = BURST, period: float = PERIOD_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._burst, self._period, self._clock = burst, period, clock
        self._lock = threading.Lock()
        #: key -> [lines logged, suppressed since the last line, time of the last line]
        self._keys: dict[Hashable, list[float]] = {}

    def log(self, logger: logging.Logger, level: int, key: Hashable, message: str, *args: object) -> bool:
        """Log ``message % args`` unless ``key`` is over its budget; True if it was logged."""
        now = self._clock()
        with self._lock:
            if key not in self._keys and len(self._keys) >= MAX_KEYS:
                key = "(other keys)"
            entry = self._keys.setdefault(key, [0, 0, now])
            logged, suppressed, last = entry
            if logged >= self._burst and now - last < self._period:
                entry[1] = suppressed + 1
                return False
            entry[0], entry[1], entry[2] = logged + 1, 0, now
        if suppressed:
            message += f" ({int(suppressed)} more like it suppressed)"
        logger.log(level, message, *args)
        return True

    def warning(self, logger: logging.Logger, key: Hashable, message: str, *args: object) -> bool:
        return self.log(logger, logging.WARNING, key, message, *args)


#: The limiter shared by every device and thread of the VMM.
guest_log = RateLimitedLog()

__all__ = ["BURST", "PERIOD_SECONDS", "RateLimitedLog", "guest_log"]
