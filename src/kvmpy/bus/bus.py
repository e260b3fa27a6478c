"""Port-I/O and MMIO buses: address ranges mapped to devices, with counters.

A bus turns an absolute address into ``(device, offset)`` and counts every
access per registered range, so ``--stats`` can say which device the guest
kept exiting for. Accesses that hit no device are answered the way a PC
answers them (reads see all-ones, writes vanish) and counted per address.

Lookups run on every vCPU thread at every exit and take no lock: the table
they read (bases and ranges, two tuples) is immutable and replaced whole by
``register``/``unregister``, which serialise among themselves. A reader sees
the table from before a change or the one after it, never a half-edited one.

The vCPU threads do not go through :meth:`Bus.read`/:meth:`Bus.write` at each
exit but through a :class:`BusDispatcher` each (``bus.dispatcher()``): it
remembers, per address, which range answered (dropped whenever the table is
replaced), and counts into counters of its own that only its thread writes, so
no increment needs a lock and none is lost. A range's counters are the sum of
the bus's own (callers of ``read``/``write``, under a lock) and every
dispatcher's.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kvmpy.bus.device import BusDevice
from kvmpy.errors import ConfigError

#: Distinct unclaimed addresses counted one by one; the rest share OTHER_UNCLAIMED.
MAX_UNCLAIMED_ADDRESSES = 4096
OTHER_UNCLAIMED = -1


class BusOverlapError(ConfigError):
    """Two devices were registered over the same addresses."""


class AccessCounter:
    """Accesses to one range by one counting party (the bus itself, or one dispatcher)."""

    __slots__ = ("bytes", "handle_ns", "reads", "writes")

    def __init__(self) -> None:
        self.reads = 0
        self.writes = 0
        self.bytes = 0
        #: Wall time spent handling them: inside the device's handler for ``Bus.read``/``write``;
        #: for a dispatcher, the whole Python handling of the exits that reached the range (its
        #: owner adds it, see :meth:`BusDispatcher.write`).
        self.handle_ns = 0


@dataclass(eq=False)
class BusRange:
    """One device registered at ``[base, base + size)``, with its access counters."""

    base: int
    size: int
    device: BusDevice
    name: str
    #: The bus's own counts (``Bus.read``/``write``), then one per dispatcher that reached the range.
    counters: list[AccessCounter] = field(default_factory=lambda: [AccessCounter()])

    @property
    def end(self) -> int:
        return self.base + self.size

    @property
    def reads(self) -> int:
        return sum(c.reads for c in self.counters)

    @property
    def writes(self) -> int:
        return sum(c.writes for c in self.counters)

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.counters)

    @property
    def handle_ns(self) -> int:
        return sum(c.handle_ns for c in self.counters)

    def new_counter(self) -> AccessCounter:
        counter = AccessCounter()
        self.counters.append(counter)  # one atomic append: readers summing see it or not yet
        return counter


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
    #: Every dispatcher handed out, whose unclaimed counts ``unclaimed()`` adds up.
    _dispatchers: list[BusDispatcher] = field(default_factory=list)

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
            self._forget_routes()
            return entry

    def unregister(self, entry: BusRange) -> None:
        with self._lock:
            table = self._table
            index = table.ranges.index(entry)
            self._table = _Table(
                table.bases[:index] + table.bases[index + 1 :],
                table.ranges[:index] + table.ranges[index + 1 :],
            )
            self._forget_routes()

    def _forget_routes(self) -> None:
        """After the table was replaced: every dispatcher looks its addresses up again."""
        with self._count_lock:
            dispatchers = list(self._dispatchers)
        for dispatcher in dispatchers:
            dispatcher.forget_routes()

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
        own = entry.counters[0]
        with self._count_lock:  # several threads reach one device: no increment may be lost
            own.reads += 1
            own.bytes += len(data)
            own.handle_ns += spent
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
        own = entry.counters[0]
        with self._count_lock:
            own.writes += 1
            own.bytes += len(data)
            own.handle_ns += spent
        return True

    def _unclaimed(self, address: int) -> None:
        with self._count_lock:
            _count_unclaimed(self.unhandled, address)

    def unclaimed(self) -> list[tuple[int, int]]:
        """(address, accesses) of unclaimed accesses, sorted (OTHER_UNCLAIMED: the overflow)."""
        with self._count_lock:
            total = Counter(self.unhandled)
            dispatchers = list(self._dispatchers)
        for dispatcher in dispatchers:
            total.update(dispatcher.unhandled.copy())  # a copy: its thread may add a key meanwhile
        return sorted(total.items())

    def dispatcher(self) -> BusDispatcher:
        """A lock-free way into this bus for one thread (a vCPU's): see :class:`BusDispatcher`."""
        dispatcher = BusDispatcher(self)
        with self._count_lock:
            self._dispatchers.append(dispatcher)
        return dispatcher

    def stats(self) -> list[BusAccessStats]:
        return [
            BusAccessStats(r.name, r.base, r.size, r.reads, r.writes, r.bytes, r.handle_ns)
            for r in self._table.ranges
        ]

    @property
    def ranges(self) -> tuple[BusRange, ...]:
        return self._table.ranges


def _count_unclaimed(unhandled: dict[int, int], address: int) -> None:
    if address not in unhandled and len(unhandled) >= MAX_UNCLAIMED_ADDRESSES:
        address = OTHER_UNCLAIMED  # a guest can touch every address there is: bounded
    unhandled[address] = unhandled.get(address, 0) + 1


#: Addresses a dispatcher remembers the range of (a guest can touch every address there is).
MAX_ROUTES = 4096

#: What a dispatcher remembers for an address: the device's read and write, the address's offset
#: in its range, the bytes from there to the range's end, the dispatcher's counter for the range;
#: None for an address no device claims.
_Route = tuple[Callable[[int, memoryview], None], Callable[[int, bytes], None], int, int, AccessCounter]


class BusDispatcher:
    """One thread's way into a bus: the same dispatch and counts as ``Bus.read``/``write``, cheaper.

    The thread that owns it is the only one that calls it (and so the only writer of its
    counters: no lock). It remembers the route of each address it has seen (bounded by
    MAX_ROUTES), so a repeated access costs one dictionary lookup, not a search; the bus
    drops every dispatcher's routes when it replaces its table (see ``_route`` for why a
    lookup racing that never keeps a stale route). It does not time the device: ``read``
    and ``write`` return the counter they charged, and the caller adds the time it measured
    for the whole exit to its ``handle_ns``.
    """

    def __init__(self, bus: Bus) -> None:
        self._bus = bus
        self._routes: dict[int, _Route | None] = {}
        #: Per range this dispatcher's counter (kept across table changes while the range lives).
        self._counters: dict[BusRange, AccessCounter] = {}
        #: Unclaimed accesses this dispatcher saw: address -> count (bounded as the bus's).
        self.unhandled: dict[int, int] = {}

    def read(self, address: int, data: memoryview) -> AccessCounter | None:
        """Fill ``data`` from the device at ``address`` (all-ones if none); the counter charged,
        None if no device claims the access."""
        try:
            route = self._routes[address]
        except KeyError:
            route = self._route(address)
        size = len(data)
        if route is not None and size <= route[3]:
            read, _, offset, _, counter = route
            read(offset, data)
            counter.reads += 1
            counter.bytes += size
            return counter
        data[:] = b"\xff" * size
        self._unclaimed(address)
        return None

    def write(self, address: int, data: bytes) -> AccessCounter | None:
        """Give ``data`` to the device at ``address`` (dropped if none); the counter charged,
        None if no device claims the access."""
        try:
            route = self._routes[address]
        except KeyError:
            route = self._route(address)
        size = len(data)
        if route is not None and size <= route[3]:
            _, write, offset, _, counter = route
            write(offset, data)
            counter.writes += 1
            counter.bytes += size
            return counter
        self._unclaimed(address)
        return None

    def _unclaimed(self, address: int) -> None:
        unhandled = self.unhandled
        if address in unhandled:
            unhandled[address] += 1
        else:
            _count_unclaimed(unhandled, address)

    def forget_routes(self) -> None:
        """The bus's table changed (any thread): look every address up again."""
        self._routes = {}

    def _route(self, address: int) -> _Route | None:
        # The routes dict is loaded before the table is searched: the bus swaps its table first
        # and then gives each dispatcher a new dict, so a route found in an old table can only
        # land in the old dict, which is dropped.
        routes = self._routes
        table = self._bus._table
        entry = self._bus.find(address)
        route: _Route | None = None
        if entry is not None:
            counters = self._counters
            counter = counters.get(entry)
            if counter is None:
                if len(counters) >= len(table.ranges):  # ranges came and went: keep the live ones
                    self._counters = counters = {e: c for e, c in counters.items() if e in table.ranges}
                counter = counters[entry] = entry.new_counter()
            device = entry.device
            route = (device.read, device.write, address - entry.base, entry.end - address, counter)
        if len(routes) < MAX_ROUTES:
            routes[address] = route
        return route


__all__ = ["AccessCounter", "Bus", "BusAccessStats", "BusDispatcher", "BusOverlapError", "BusRange"]
