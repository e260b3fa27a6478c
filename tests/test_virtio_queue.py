"""The split virtqueue against a mock driver, and against hostile rings."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.testing.virtio_driver import Buffer, MockDriver
from kvmpy.virtio.queue import QueueError, SplitQueue

RAM = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    memory = GuestMemory.anonymous([(0, RAM)])
    yield memory
    memory.close()


def test_chain_roundtrip(mem: GuestMemory) -> None:
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000)
    mem.write(0x40000, b"request")
    head = driver.add([Buffer(0x40000, 7), Buffer(0x41000, 64, writable=True)])
    chain = queue.pop(mem)
    assert chain is not None and chain.head == head
    assert chain.read_all() == b"request" and chain.writable_length == 64
    chain.writable[0][:5] = b"reply"
    queue.push(mem, chain.head, 5)
    assert driver.used_entries() == [(head, 5)]
    assert mem.read(0x41000, 5) == b"reply"
    assert queue.pop(mem) is None


def test_indirect_descriptors(mem: GuestMemory) -> None:
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000)
    driver.add([Buffer(0x40000, 16), Buffer(0x40100, 32), Buffer(0x41000, 8, writable=True)], indirect=True)
    chain = queue.pop(mem)
    assert chain is not None
    assert [len(b) for b in chain.readable] == [16, 32] and chain.writable_length == 8


def test_event_index_suppresses_interrupts(mem: GuestMemory) -> None:
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000)
    queue.event_idx = True
    used_event = driver.avail + 4 + 2 * 16
    mem.write_u16(used_event, 5)  # the driver wants an interrupt once entry 5 is used
    signals = []
    for _ in range(7):
        driver.add([Buffer(0x41000, 8, writable=True)])
        chain = queue.pop(mem)
        assert chain is not None
        queue.push(mem, chain.head, 0)
        signals.append(queue.needs_interrupt(mem))
    assert signals == [False, False, False, False, False, True, False]
    avail_event = driver.used + 4 + 8 * 16
    assert mem.read_u16(avail_event) == 7  # and we ask to be kicked at the next new entry


def test_event_index_interrupts_for_a_batch_that_crosses_used_event(mem: GuestMemory) -> None:
    """Regression: a first batch of 9 used entries with used_event 0 must interrupt (virtio-net RX)."""
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000)
    queue.event_idx = True
    for _ in range(9):
        driver.add([Buffer(0x41000, 8, writable=True)])
    while (chain := queue.pop(mem)) is not None:
        queue.push(mem, chain.head, 0)
    assert queue.needs_interrupt(mem)  # used_event 0 lies inside the batch 0..8
    driver.add([Buffer(0x41000, 8, writable=True)])
    chain = queue.pop(mem)
    assert chain is not None
    queue.push(mem, chain.head, 0)
    assert not queue.needs_interrupt(mem)  # the driver has not moved used_event since


def test_no_interrupt_flag_without_event_index(mem: GuestMemory) -> None:
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000)
    mem.write_u16(driver.avail, 1)  # VRING_AVAIL_F_NO_INTERRUPT
    driver.add([Buffer(0x41000, 8, writable=True)])
    chain = queue.pop(mem)
    assert chain is not None
    queue.push(mem, chain.head, 0)
    assert not queue.needs_interrupt(mem)


@pytest.mark.parametrize(
    ("descriptor", "message"),
    [
        (struct.pack("<QIHH", RAM - 4, 64, 0, 0), "not guest RAM"),
        (struct.pack("<QIHH", 0x40000, 8, 1, 99), "outside its table"),
        (struct.pack("<QIHH", 0x40000, 8, 1, 0), "loops"),
        (struct.pack("<QIHH", 0x50000, 17, 4, 0), "indirect table"),
    ],
)
def test_broken_descriptors_are_queue_errors(mem: GuestMemory, descriptor: bytes, message: str) -> None:
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000)
    driver.add([Buffer(0x40000, 8)])
    mem.write(driver.desc, descriptor)
    with pytest.raises(QueueError, match=message):
        queue.pop(mem)


def test_nested_indirect_refused(mem: GuestMemory) -> None:
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000)
    driver.add([Buffer(0x40000, 8)], indirect=True)
    mem.write(driver.indirect_area, struct.pack("<QIHH", driver.indirect_area, 16, 4, 0))
    with pytest.raises(QueueError, match="inside an indirect"):
        queue.pop(mem)


def test_avail_index_running_ahead(mem: GuestMemory) -> None:
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000)
    mem.write_u16(driver.avail + 2, 40)
    with pytest.raises(QueueError, match="ran 40 entries ahead"):
        queue.pop(mem)


def test_rings_outside_ram_refused(mem: GuestMemory) -> None:
    queue = SplitQueue(16)
    queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = 16, RAM - 64, 0x1000, 0x2000
    with pytest.raises(QueueError, match="not guest RAM"):
        queue.check_layout(mem)
    queue.size = 12
    with pytest.raises(QueueError, match="power of two"):
        queue.check_layout(mem)


@settings(max_examples=300, deadline=None)
@given(
    table=st.binary(min_size=16 * 16, max_size=16 * 16),
    ring=st.lists(st.integers(0, 0xFFFF), min_size=16, max_size=16),
    avail_idx=st.integers(0, 0xFFFF),
    indirect=st.binary(min_size=0, max_size=256),
)
def test_hostile_rings_only_raise_queue_errors(
    table: bytes, ring: list[int], avail_idx: int, indirect: bytes
) -> None:
    mem = GuestMemory.anonymous([(0, RAM)])
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000)
    mem.write(driver.desc, table)
    mem.write(driver.avail + 4, struct.pack("<16H", *ring))
    mem.write_u16(driver.avail + 2, avail_idx)
    mem.write(0x20000, indirect)
    try:
        for _ in range(20):
            chain = queue.pop(mem)
            if chain is None:
                break
            # every buffer is a view inside guest RAM (checked in a generator: no view outlives it)
            assert all(len(buffer) <= RAM for buffer in chain.readable + chain.writable)
            queue.push(mem, chain.head, 0)
    except QueueError:
        pass
    finally:
        chain = None  # its views must go before the RAM is unmapped
        mem.close()


def test_rings_follow_a_moved_queue_and_never_pin_guest_ram() -> None:
    """Ring locations are looked up once per layout: a new layout is looked up afresh, and
    a queue holding them does not keep the guest's RAM from being unmapped."""
    memory = GuestMemory.anonymous([(0, RAM)])
    queue = SplitQueue(16)
    first = MockDriver(memory, queue, 0x10000)
    head = first.add([Buffer(0x40000, 8)])
    chain = queue.pop(memory)
    assert chain is not None and chain.head == head
    queue.push(memory, head, 0)
    del chain
    queue.reset()  # the driver resets the device and sets the queue up elsewhere
    second = MockDriver(memory, queue, 0x80000)
    head = second.add([Buffer(0x40000, 8)])
    chain = queue.pop(memory)
    assert chain is not None and chain.head == head
    queue.push(memory, head, 0)
    assert second.used_entries() == [(head, 0)] and first.used_entries() == [(0, 0)]
    del chain
    memory.close()  # would raise BufferError if the queue held slices of guest RAM
    with pytest.raises(ValueError):
        queue.pending(memory)  # the released region view refuses access rather than crash
