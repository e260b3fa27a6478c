"""The pvpanic device: the guest kernel tells the VMM it has panicked.

Linux's pvpanic driver finds it through the ACPI device QEMU0001 (kvmpy's
DSDT describes it at an I/O port), reads the events it supports, and writes
PANICKED from its panic notifier. kvmpy then stops the VM with a clear
report instead of leaving a dead guest spinning.
"""

from __future__ import annotations

from collections.abc import Callable

PANICKED = 1 << 0
CRASH_LOADED = 1 << 1
SUPPORTED_EVENTS = PANICKED | CRASH_LOADED


class PvPanic:
    """One I/O port: reads give the supported events, writes report events."""

    def __init__(
        self, on_panic: Callable[[], None], on_crash_loaded: Callable[[], None] | None = None
    ) -> None:
        self._on_panic = on_panic
        self._on_crash_loaded = on_crash_loaded

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes([SUPPORTED_EVENTS if offset == 0 else 0xFF]) * len(data)

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or not data:
            return
        if data[0] & PANICKED:
            self._on_panic()
        elif data[0] & CRASH_LOADED and self._on_crash_loaded is not None:
            self._on_crash_loaded()


__all__ = ["CRASH_LOADED", "PANICKED", "SUPPORTED_EVENTS", "PvPanic"]
