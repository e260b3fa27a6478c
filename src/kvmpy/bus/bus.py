"""Port-I/O and MMIO buses: address ranges mapped to devices, with counters.

A bus turns an absolute address into ``(device, offset)`` and counts every
access per registered range, so ``--stats`` can say which device the guest
kept exiting for. Accesses that hit no device are answered the way a PC
answers them (reads see all-ones, writes vanish) and counted per address.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from kvmpy.bus.device import BusDevice
from kvmpy.errors import ConfigError


class BusOverlapError(ConfigError):
    """Two devices were registered over the same addresses."""


@dataclass(eq=False)
class BusRange:
    """One device registered at ``[base, base + size)``, with its access counters."""

    base: int
    size: int
    device: BusDevice
    name: str
    reads: int = 0
    writes: int = 0
    bytes: int = 0
    #: Wall time spent inside the device's read/write handlers.
    handle_ns: int = 0

    @property
    def end(self) -> int:
        return self.base + self.size


@dataclass(frozen=True, slots=True)
class BusAccessStats:
    """Counters of one bus range, as plain data."""

    name: str
    base: int
    size: int
    reads: int
    writes: int
    bytes: int
    handle_ns: int


@dataclass
class Bus:
    """An address space (ports or guest-physical MMIO) of devices."""

    kind: str  # "pio" or "mmio", for messages
    _ranges: list[BusRange] = field(default_factory=list)
    _bases: list[int] = field(default_factory=list)
    #: Unclaimed accesses: address -> count (reads and writes together).
    unhandled: Counter[int] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, base: int, size: int, device: BusDevice, name: str) -> BusRange:
        """Claim ``[base, base+size)`` for ``device``; overlapping claims are refused."""
        if size <= 0 or base < 0:
            raise ConfigError(f"{self.kind} range for {name} is empty or negative")
        with self._lock:
            index = bisect.bisect_right(self._bases, base)
            before = self._ranges[index - 1] if index > 0 else None
            after = self._ranges[index] if index < len(self._ranges) else None
            for other in (before, after):
                if other is not None and base < other.end and other.base < base + size:
                    raise BusOverlapError(
                        f"{self.kind} range {base:#x}-{base + size - 1:#x} for {name} overlaps "
                        f"{other.name} at {other.base:#x}-{other.end - 1:#x}"
                    )
            entry = BusRange(base, size, device, name)
            self._ranges.insert(index, entry)
            self._bases.insert(index, base)
            return entry

    def unregister(self, entry: BusRange) -> None:
        with self._lock:
            index = self._ranges.index(entry)
            del self._ranges[index]
            del self._bases[index]

    def find(self, address: int, size: int = 1) -> BusRange | None:
        """The range containing all of ``[address, address+size)``, or None."""
        index = bisect.bisect_right(self._bases, address) - 1
        if index < 0:
            return None
        entry = self._ranges[index]
        if address + size <= entry.end:
            return entry
        return None

    def read(self, address: int, data: memoryview) -> bool:
        """Fill ``data`` from the device at ``address``; all-ones if none. True if handled."""
        entry = self.find(address, len(data))
        if entry is None:
            data[:] = b"\xff" * len(data)
            self.unhandled[address] += 1
            return False
        entry.reads += 1
        entry.bytes += len(data)
        start = time.perf_counter_ns()
        entry.device.read(address - entry.base, data)
        entry.handle_ns += time.perf_counter_ns() - start
        return True

    def write(self, address: int, data: bytes) -> bool:
        """Give ``data`` to the device at ``address``; dropped if none. True if handled."""
        entry = self.find(address, len(data))
        if entry is None:
            self.unhandled[address] += 1
            return False
        entry.writes += 1
        entry.bytes += len(data)
        start = time.perf_counter_ns()
        entry.device.write(address - entry.base, data)
        entry.handle_ns += time.perf_counter_ns() - start
        return True

    def stats(self) -> list[BusAccessStats]:
        return [
            BusAccessStats(r.name, r.base, r.size, r.reads, r.writes, r.bytes, r.handle_ns)
            for r in self._ranges
        ]

    @property
    def ranges(self) -> tuple[BusRange, ...]:
        return tuple(self._ranges)


__all__ = ["Bus", "BusAccessStats", "BusOverlapError", "BusRange"]
