"""GuestMemory: bounds checks, zero-copy slices, typed access, the MMIO hole."""

from __future__ import annotations

import ctypes

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.arch.x86 import layout
from kvmpy.memory.guest_memory import GuestMemory, GuestMemoryError

MiB = 1 << 20


@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory.anonymous([(0, 2 * MiB), (4 * MiB, 1 * MiB)])
    yield mem
    mem.close()


def test_read_write_roundtrip(memory: GuestMemory) -> None:
    memory.write(0x1000, b"hello")
    assert memory.read(0x1000, 5) == b"hello"
    memory.write_u64(0x2000, 0x1122334455667788)
    assert memory.read_u32(0x2000) == 0x55667788
    assert memory.read_u16(0x2006) == 0x1122
    assert memory.read_u8(0x2007) == 0x11


def test_slice_is_zero_copy(memory: GuestMemory) -> None:
    view = memory.slice(4 * MiB + 16, 4)
    view[:] = b"abcd"
    assert memory.read(4 * MiB + 16, 4) == b"abcd"


def test_struct_access(memory: GuestMemory) -> None:
    class Pair(ctypes.Structure):
        _fields_ = [("a", ctypes.c_uint32), ("b", ctypes.c_uint64)]

    memory.write_struct(0x3000, Pair(7, 9))
    pair = memory.read_struct(0x3000, Pair)
    assert (pair.a, pair.b) == (7, 9)


@pytest.mark.parametrize(
    ("gpa", "size"),
    [
        (2 * MiB, 1),  # just past the first region
        (2 * MiB - 2, 4),  # straddles the end of a region
        (3 * MiB, 8),  # in the gap
        (5 * MiB - 1, 2),  # past the second region
        (1 << 60, 1),
        (-1, 1),
        (0, -1),
    ],
)
def test_out_of_bounds_is_a_clear_error(memory: GuestMemory, gpa: int, size: int) -> None:
    with pytest.raises(GuestMemoryError, match="guest memory access"):
        memory.slice(gpa, size)


@given(gpa=st.integers(-(1 << 64), 1 << 64), size=st.integers(-16, 1 << 22))
def test_any_guest_address_is_checked(gpa: int, size: int) -> None:
    mem = GuestMemory.anonymous([(0, 64 * 1024)])
    try:
        view = mem.slice(gpa, size)
    except GuestMemoryError:
        assert not (gpa >= 0 and size >= 0 and gpa + size <= 64 * 1024)
    else:
        assert len(view) == size and gpa >= 0 and gpa + size <= 64 * 1024
        view.release()
    mem.close()


def test_overlapping_regions_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        GuestMemory.anonymous([(0, 2 * MiB), (MiB, MiB)])


def test_ram_ranges_leave_the_mmio_hole() -> None:
    assert layout.ram_ranges(256 * MiB) == [(0, 256 * MiB)]
    low, high = layout.ram_ranges(4 << 30)
    assert low == (0, layout.MMIO_HOLE_START)
    assert high == (layout.HIGH_RAM_START, (4 << 30) - layout.MMIO_HOLE_START)


def test_written_pages_are_recorded_for_diff_snapshots_and_migration() -> None:
    from kvmpy.memory.guest_memory import PAGE_SIZE

    memory = GuestMemory.anonymous([(0, 64 * PAGE_SIZE), (1 << 32, 16 * PAGE_SIZE)])
    with pytest.raises(ValueError, match="not tracked"):
        memory.take_written()
    memory.track_writes()
    memory.write(3 * PAGE_SIZE + 10, b"x" * (PAGE_SIZE + 1))  # pages 3 and 4
    memory.slice((1 << 32) + 5 * PAGE_SIZE, 1)  # a view handed out counts, it may be written
    view, offset = memory.locate(7 * PAGE_SIZE, 16)  # a ring: written at will, always dirty
    first, second = memory.take_written()
    assert [page for page, flag in enumerate(first) if flag] == [3, 4, 7]
    assert [page for page, flag in enumerate(second) if flag] == [5]
    view[offset] = 1  # written through the located view, never through GuestMemory again
    first, second = memory.take_written()
    assert [page for page, flag in enumerate(first) if flag] == [7] and not any(second)
    memory.close()


def test_is_zeros() -> None:
    from kvmpy.memory.guest_memory import is_zeros

    data = bytearray(1 << 20)
    assert is_zeros(memoryview(data))
    data[-1] = 1
    assert not is_zeros(memoryview(data))
