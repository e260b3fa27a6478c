"""Port-I/O and MMIO buses: address ranges mapped to devices, with counters.

A bus turns an absolute address into ``(device, offset)`` and counts every
access per registered range, so ``--stats`` can say which device the guest
kept exiting for. Accesses that hit no device are answered the way a PC
answers them (reads see all-ones, writes vanish) and counted per address.

Lookups run on every vCPU thread at every exit and take no lock: the table
they read (bases and ranges, two tuples) is immutable and replaced whole by
``register``/``unregister``, which serialise among themselves. A reader sees
the table from before a change or the one after it, never a half-edited one.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from kvmpy.bus.device import BusDevice
from kvmpy.errors import ConfigError

#: Distinct unclaimed addresses counted one by one; the rest share OTHER_UNCLAIMED.
MAX_UNCLAIMED_ADDRESSES = 4096
OTHER_UNCLAIMED = -1


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


@dataclass(frozen=True, slots=True)
class _Table:
    """The lookup table: range bases in order and their ranges, never edited once made."""

    bases: tuple[int, ...] = ()
    ranges: tuple[BusRange, ...] = ()


@dataclass
class Bus:
    """An address space (ports or guest-physical MMIO) of devices."""

    kind: str  # "pio" or "mmio", for messages
    #: Swapped whole under ``_lock``; readers load it once and take no lock.
    _table: _Table = field(default_factory=_Table)
    #: Unclaimed accesses: address -> count (reads and writes together).
    unhandled: Counter[int] = field(default_factory=Counter)
    #: Serialises writers of ``_table`` only.
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Held only to change counters (never while calling a device).
    _count_lock: threading.Lock = field(default_factory=threading.Lock)

    def register(self, base: int, size: int, device: BusDevice, name: str) -> BusRange:
        """Claim ``[base, base+size)`` for ``device``; overlapping claims are refused."""
        if size <= 0 or base < 0:
            raise ConfigError(f"{self.kind} range for {name} is empty or negative")
        with self._lock:
            table = self._table
            index = bisect.bisect_right(table.bases, base)
            before = table.ranges[index - 1] if index > 0 else None
            after = table.ranges[index] if index < len(table.ranges) else None
            for other in (before, after):
                if other is not None and base < other.end and other.base < base + size:
                    raise BusOverlapError(
                        f"{self.kind} range {base:#x}-{base + size - 1:#x} for {name} overlaps "
                        f"{other.name} at {other.base:#x}-{other.end - 1:#x}"
                    )
            entry = BusRange(base, size, device, name)
            self._table = _Table(
                (*table.bases[:index], base, *table.bases[index:]),
                (*table.ranges[:index], entry, *table.ranges[index:]),
            )
            return entry

    def unregister(self, entry: BusRange) -> None:
        with self._lock:
            table = self._table
            index = table.ranges.index(entry)
            self._table = _Table(
                table.bases[:index] + table.bases[index + 1 :],
                table.ranges[:index] + table.ranges[index + 1 :],
            )

    def find(self, address: int, size: int = 1) -> BusRange | None:
        """The range containing all of ``[address, address+size)``, or None (no lock: see above)."""
        table = self._table  # one load: bases and ranges from the same table
        index = bisect.bisect_right(table.bases, address) - 1
        if index < 0:
            return None
        entry = table.ranges[index]
        if address + size <= entry.end:
            return entry
        return None

    def read(self, address: int, data: memoryview) -> bool:
        """Fill ``data`` from the device at ``address``; all-ones if none. True if handled."""
        entry = self.find(address, len(data))
        if entry is None:
            data[:] = b"\xff" * len(data)
            self._unclaimed(address)
            return False
        start = time.perf_counter_ns()
        entry.device.read(address - entry.base, data)
        spent = time.perf_counter_ns() - start
        with self._count_lock:  # several vCPUs reach one device: no increment may be lost
            entry.reads += 1
            entry.bytes += len(data)
            entry.handle_ns += spent
        return True

    def write(self, address: int, data: bytes) -> bool:
        """Give ``data`` to the device at ``address``; dropped if none. True if handled."""
        entry = self.find(address, len(data))
        if entry is None:
            self._unclaimed(address)
            return False
        start = time.perf_counter_ns()
        entry.device.write(address - entry.base, data)
        spent = time.perf_counter_ns() - start
        with self._count_lock:
            entry.writes += 1
            entry.bytes += len(data)
            entry.handle_ns += spent
        return True

    def _unclaimed(self, address: int) -> None:
        with self._count_lock:
            if address not in self.unhandled and len(self.unhandled) >= MAX_UNCLAIMED_ADDRESSES:
                address = OTHER_UNCLAIMED  # a guest can touch every address there is: bounded
            self.unhandled[address] += 1

    def unclaimed(self) -> list[tuple[int, int]]:
        """(address, accesses) of unclaimed accesses, sorted (OTHER_UNCLAIMED: the overflow)."""
        with self._count_lock:
            return sorted(self.unhandled.items())

    def stats(self) -> list[BusAccessStats]:
        return [
            BusAccessStats(r.name, r.base, r.size, r.reads, r.writes, r.bytes, r.handle_ns)
            for r in self._table.ranges
        ]

    @property
    def ranges(self) -> tuple[BusRange, ...]:
        return self._table.ranges


__all__ = ["Bus", "BusAccessStats", "BusOverlapError", "BusRange"]
