"""A console sink for tests: it keeps what the guest wrote and reads the counter guest's ticks."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

_TICK = re.compile(r"tick (\d+)\n")


def ticks(text: str) -> list[int]:
    """The counter guest's ``tick N`` lines in ``text``."""
    return [int(n) for n in _TICK.findall(text)]


def wait_until(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.01)


class CapturedConsole:
    """A thread-safe serial sink: the guest writes on its threads, the test reads on its own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = bytearray()

    def write(self, data: bytes) -> int:
        with self._lock:
            self._data += data
        return len(data)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        with self._lock:
            return self._data.decode("utf-8", "replace")

    def ticks(self) -> list[int]:
        return ticks(self.text)

    def wait_for_ticks(self, count: int, timeout: float = 30.0) -> list[int]:
        wait_until(lambda: len(self.ticks()) >= count, timeout, f"{count} ticks (got {self.ticks()[-3:]})")
        return self.ticks()


__all__ = ["CapturedConsole", "ticks", "wait_until"]
