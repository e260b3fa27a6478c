"""Bus dispatch, offsets, overlap rejection and counters."""

from __future__ import annotations

import pytest

from kvmpy.bus import Bus, BusOverlapError


class Recorder:
    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, data: memoryview) -> None:
        self.reads.append((offset, len(data)))
        data[:] = bytes([offset & 0xFF]) * len(data)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, bytes(data)))


def test_dispatch_uses_offsets() -> None:
    bus = Bus("pio")
    device = Recorder()
    bus.register(0x3F8, 8, device, "uart")
    assert bus.write(0x3FB, b"\x80")
    buffer = bytearray(1)
    assert bus.read(0x3FD, memoryview(buffer))
    assert device.writes == [(3, b"\x80")]
    assert device.reads == [(5, 1)]
    assert buffer == b"\x05"


def test_unclaimed_reads_all_ones_and_counts() -> None:
    bus = Bus("pio")
    buffer = bytearray(4)
    assert not bus.read(0x1234, memoryview(buffer))
    assert buffer == b"\xff\xff\xff\xff"
    assert not bus.write(0x1234, b"\x00")
    assert bus.unhandled[0x1234] == 2


def test_access_crossing_the_end_is_unclaimed() -> None:
    bus = Bus("mmio")
    bus.register(0x1000, 0x10, Recorder(), "dev")
    assert not bus.write(0x100E, b"\x00" * 4)


@pytest.mark.parametrize(("base", "size"), [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F0, 0x20)])
def test_overlap_rejected(base: int, size: int) -> None:
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder(), "uart")
    with pytest.raises(BusOverlapError, match="overlaps uart"):
        bus.register(base, size, Recorder(), "other")


def test_adjacent_ranges_allowed_and_counted() -> None:
    bus = Bus("pio")
    first, second = Recorder(), Recorder()
    bus.register(0x10, 0x10, first, "first")
    bus.register(0x20, 0x10, second, "second")
    bus.register(0x00, 0x10, Recorder(), "zeroth")
    for _ in range(3):
        bus.write(0x20, b"\x01")
    bus.write(0x1F, b"\x02")
    stats = {row.name: row for row in bus.stats()}
    assert stats["second"].writes == 3
    assert stats["first"].writes == 1
    assert second.writes[0] == (0, b"\x01")
    assert first.writes == [(0xF, b"\x02")]


def test_lookups_during_a_bar_move_never_see_a_half_updated_table() -> None:
    """``find`` takes no lock: a register/unregister racing it must not give a wrong device or raise.

    A BAR move used to delete from the bus's two lists one after the other, so a vCPU thread's
    lookup in between saw the base of one range beside the device of another (or ran off the end).
    """
    import sys
    import threading
    import time

    bus = Bus("mmio")
    stable = Recorder()
    for i in range(8):
        bus.register(0x10_000 * (i + 1), 0x1000, Recorder(), f"neighbour{i}")
    bus.register(0x100_000, 0x1000, stable, "stable")
    moving = Recorder()
    failures: list[str] = []
    done = threading.Event()

    def move_bars() -> None:
        while not done.is_set():
            for address in (0x8000, 0x48_000, 0x200_000):
                entry = bus.register(address, 0x1000, moving, "moving")
                bus.unregister(entry)

    def look_up() -> None:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not failures:
            try:
                found = bus.find(0x100_800, 4)
            except Exception as error:  # noqa: BLE001 - any exception here is the bug
                failures.append(repr(error))
                break
            if found is None or found.device is not stable:
                failures.append(f"found {found.name if found else None} for the stable device")
        done.set()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=move_bars), threading.Thread(target=look_up)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert failures == []


def test_unclaimed_addresses_are_counted_within_a_bound() -> None:
    from kvmpy.bus.bus import MAX_UNCLAIMED_ADDRESSES, OTHER_UNCLAIMED

    bus = Bus("mmio")
    for address in range(MAX_UNCLAIMED_ADDRESSES + 1000):
        bus.write(0x1000_0000 + address * 8, b"\0")
    counted = dict(bus.unclaimed())
    assert len(counted) == MAX_UNCLAIMED_ADDRESSES + 1
    assert counted[OTHER_UNCLAIMED] == 1000
    assert sum(counted.values()) == MAX_UNCLAIMED_ADDRESSES + 1000


def test_no_access_count_is_lost_between_threads() -> None:
    import threading

    class Nothing:
        def read(self, offset: int, data: memoryview) -> None:
            data[:] = b"\0" * len(data)

        def write(self, offset: int, data: bytes) -> None:
            pass

    bus = Bus("pio")
    entry = bus.register(0x80, 1, Nothing(), "sink")

    def hammer() -> None:
        for _ in range(20000):
            bus.write(0x80, b"\1")

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert entry.writes == 80000 and entry.bytes == 80000


def test_a_dispatcher_dispatches_and_counts_as_the_bus_does() -> None:
    bus = Bus("pio")
    device = Recorder()
    entry = bus.register(0x3F8, 8, device, "uart")
    dispatcher = bus.dispatcher()
    for _ in range(3):
        assert dispatcher.write(0x3FB, b"\x80") is not None
    buffer = bytearray(2)
    assert dispatcher.read(0x3FD, memoryview(buffer)) is not None
    assert bus.write(0x3F8, b"A")  # the bus's own path counts beside the dispatcher's
    assert device.writes == [(3, b"\x80")] * 3 + [(0, b"A")]
    assert device.reads == [(5, 2)]
    assert (entry.reads, entry.writes, entry.bytes) == (1, 4, 3 + 2 + 1)
    row = next(r for r in bus.stats() if r.name == "uart")
    assert (row.reads, row.writes) == (1, 4)


def test_a_dispatcher_charges_the_time_it_is_given_to_the_range() -> None:
    bus = Bus("mmio")
    entry = bus.register(0x1000, 0x100, Recorder(), "dev")
    charged = bus.dispatcher().write(0x1004, b"\0\0\0\0")
    assert charged is not None
    charged.handle_ns += 1234  # what the vCPU loop does with the exit's time
    assert entry.handle_ns == 1234


def test_a_dispatcher_answers_unclaimed_accesses_and_the_bus_sums_them() -> None:
    bus = Bus("mmio")
    bus.register(0x1000, 0x10, Recorder(), "dev")
    first, second = bus.dispatcher(), bus.dispatcher()
    buffer = bytearray(4)
    assert first.read(0x2000, memoryview(buffer)) is None
    assert buffer == b"\xff" * 4
    assert first.write(0x2000, b"\0") is None
    assert second.write(0x2000, b"\0") is None
    assert first.write(0x100E, b"\0" * 4) is None  # crosses the range's end
    bus.write(0x3000, b"\0")
    assert dict(bus.unclaimed()) == {0x100E: 1, 0x2000: 3, 0x3000: 1}


def test_a_dispatcher_forgets_its_routes_when_the_table_changes() -> None:
    bus = Bus("mmio")
    dispatcher = bus.dispatcher()
    assert dispatcher.write(0x5000, b"\x01") is None  # remembered as unclaimed
    late = Recorder()
    entry = bus.register(0x5000, 0x10, late, "late")
    assert dispatcher.write(0x5000, b"\x02") is not None
    assert late.writes == [(0, b"\x02")]
    bus.unregister(entry)
    moved = bus.register(0x4FF0, 0x20, late, "moved")  # the same address, another offset
    assert dispatcher.write(0x5000, b"\x03") is not None
    assert late.writes[-1] == (0x10, b"\x03")
    assert (entry.writes, moved.writes) == (1, 1)


def test_a_dispatcher_remembers_a_bounded_number_of_addresses() -> None:
    from kvmpy.bus.bus import MAX_ROUTES

    bus = Bus("mmio")
    device = Recorder()
    entry = bus.register(0, 1 << 20, device, "big")
    dispatcher = bus.dispatcher()
    for address in range(MAX_ROUTES + 100):
        assert dispatcher.write(address * 4, b"\0") is not None
    assert len(dispatcher._routes) == MAX_ROUTES  # the rest are looked up each time
    assert entry.writes == MAX_ROUTES + 100


def test_dispatchers_on_several_threads_lose_no_count() -> None:
    """Each vCPU thread counts in its own dispatcher, with no lock: the range sums them all."""
    import sys
    import threading

    bus = Bus("pio")
    entry = bus.register(0x80, 1, Recorder(), "post")
    per_thread = 20_000

    def storm() -> None:
        dispatcher = bus.dispatcher()
        for _ in range(per_thread):
            dispatcher.write(0x80, b"\x01")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=storm) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert entry.writes == 4 * per_thread
    assert entry.bytes == 4 * per_thread
