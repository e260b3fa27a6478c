"""A minimal guest-side virtio driver over GuestMemory, for testing device models.

It lays out a split virtqueue in guest memory, publishes chains (direct or
through an indirect table) and collects used entries, the way a guest
driver would, so device models can be exercised without a guest or KVM.
Like Linux's driver it hands out descriptors from a free list (so chains
are not contiguous once buffers come back out of order) and checks every
used entry against the heads it published: a device that returns an id
twice, or one that is not a head, fails the check exactly where Linux
would say "id N is not a head!".

:class:`TransportDriver` drives a :class:`VirtioPciTransport` through its
BAR 0 registers, as the guest's virtio-pci driver does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, SplitQueue

if TYPE_CHECKING:
    from kvmpy.virtio.pci_transport import VirtioPciTransport

#: Descriptors per indirect table the mock driver can publish (each chain gets its own table).
INDIRECT_SLOTS = 16


class DriverError(AssertionError):
    """The device broke the ring protocol as the driver sees it."""


@dataclass
class Buffer:
    address: int
    length: int
    writable: bool = False


class MockDriver:
    """Drives one SplitQueue whose rings live at ``base`` in ``mem``.

    With ``configure`` (the default) it also writes the ring addresses into ``queue`` and
    marks it ready, the shortcut for device tests without a transport.
    """

    def __init__(
        self,
        mem: GuestMemory,
        queue: SplitQueue | None,
        base: int,
        size: int = 16,
        *,
        configure: bool = True,
        indirect_slots: int = INDIRECT_SLOTS,
    ) -> None:
        self.mem, self.queue, self.size = mem, queue, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 4095) & ~4095
        self.indirect_area = (self.used + 6 + 8 * size + 4095) & ~4095
        self.indirect_slots = indirect_slots
        self.end = self.indirect_area + size * 16 * indirect_slots
        mem.fill(base, self.end - base)
        if configure:
            assert queue is not None
            queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = (
                size,
                self.desc,
                self.avail,
                self.used,
            )
            queue.ready = True
        self._free = list(range(size))
        self._outstanding: dict[int, list[int]] = {}  # head -> descriptors it holds
        self._avail_idx = 0
        self._used_seen = 0

    @property
    def free_descriptors(self) -> int:
        return len(self._free)

    @property
    def outstanding(self) -> int:
        """Chains published and not yet returned by the device."""
        return len(self._outstanding)

    def _write_desc(self, table: int, index: int, buffer: Buffer, flags: int, next_index: int) -> None:
        if buffer.writable:
            flags |= DESC_F_WRITE
        self.mem.write(
            table + 16 * index, struct.pack("<QIHH", buffer.address, buffer.length, flags, next_index)
        )

    def add(self, buffers: list[Buffer], *, indirect: bool = False) -> int:
        """Publish one chain; returns its head descriptor index."""
        needed = 1 if indirect else len(buffers)
        if needed > len(self._free):
            raise DriverError(f"no room: {needed} descriptors wanted, {len(self._free)} free")
        taken = [self._free.pop(0) for _ in range(needed)]
        head = taken[0]
        if indirect:
            if len(buffers) > self.indirect_slots:
                raise DriverError(f"an indirect chain holds at most {self.indirect_slots} buffers")
            table = self.indirect_area + head * 16 * self.indirect_slots
            for i, buffer in enumerate(buffers):
                last = i == len(buffers) - 1
                self._write_desc(table, i, buffer, 0 if last else DESC_F_NEXT, i + 1)
            self._write_desc(self.desc, head, Buffer(table, 16 * len(buffers)), DESC_F_INDIRECT, 0)
        else:
            for i, (index, buffer) in enumerate(zip(taken, buffers, strict=True)):
                if i == len(buffers) - 1:
                    self._write_desc(self.desc, index, buffer, 0, 0)
                else:
                    self._write_desc(self.desc, index, buffer, DESC_F_NEXT, taken[i + 1])
        self._outstanding[head] = taken
        self.mem.write_u16(self.avail + 4 + 2 * (self._avail_idx % self.size), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self._avail_idx)  # after the entry, as the driver must
        return head

    def used_entries(self) -> list[tuple[int, int]]:
        """New (head, length) entries in the used ring since the last call.

        Each id must be the head of a chain published and not yet returned (else
        :class:`DriverError`); its descriptors go back on the free list.
        """
        index = self.mem.read_u16(self.used + 2)
        entries = []
        while self._used_seen != index:
            slot = self.used + 4 + 8 * (self._used_seen % self.size)
            head, length = struct.unpack("<II", self.mem.read(slot, 8))
            descriptors = self._outstanding.pop(head, None)
            if descriptors is None:
                raise DriverError(f"id {head} is not a head!")
            self._free.extend(descriptors)
            entries.append((head, length))
            self._used_seen = (self._used_seen + 1) & 0xFFFF
        return entries


class TransportDriver:
    """The guest's virtio-pci driver, reduced to register writes on a transport's BAR 0."""

    def __init__(self, transport: VirtioPciTransport, mem: GuestMemory) -> None:
        self.transport, self.mem = transport, mem
        self._bar0 = transport.bar_device(0)
        assert self._bar0 is not None

    def write(self, offset: int, value: int, size: int) -> None:
        assert self._bar0 is not None
        self._bar0.write(offset, value.to_bytes(size, "little"))

    def read(self, offset: int, size: int) -> int:
        assert self._bar0 is not None
        data = bytearray(size)
        self._bar0.read(offset, memoryview(data))
        return int.from_bytes(data, "little")

    @property
    def status(self) -> int:
        return self.read(20, 1)

    def negotiate(self, features: int) -> None:
        """ACKNOWLEDGE, DRIVER, the features, FEATURES_OK (as far as the device accepts them)."""
        self.write(20, 0, 1)
        self.write(20, 1 | 2, 1)
        for select in (0, 1):
            self.write(8, select, 4)
            self.write(12, (features >> (32 * select)) & 0xFFFF_FFFF, 4)
        self.write(20, 1 | 2 | 8, 1)

    def setup_queue(
        self, index: int, base: int, size: int, *, indirect_slots: int = INDIRECT_SLOTS
    ) -> MockDriver:
        """Lay out queue ``index`` at ``base`` and enable it through the common configuration."""
        driver = MockDriver(self.mem, None, base, size, configure=False, indirect_slots=indirect_slots)
        self.write(22, index, 2)
        self.write(24, size, 2)
        self.write(32, driver.desc, 8)
        self.write(40, driver.avail, 8)
        self.write(48, driver.used, 8)
        self.write(26, index + 1, 2)  # MSI-X vector
        self.write(28, 1, 2)
        return driver

    def driver_ok(self) -> None:
        self.write(20, 1 | 2 | 8 | 4, 1)

    def reset(self) -> None:
        self.write(20, 0, 1)

    def kick(self, index: int) -> None:
        """A notify write that exits to the vCPU thread (no ioeventfd caught it)."""
        from kvmpy.virtio.pci_transport import NOTIFY_MULTIPLIER, NOTIFY_OFFSET

        self.write(NOTIFY_OFFSET + NOTIFY_MULTIPLIER * index, index, 2)


__all__ = ["Buffer", "DriverError", "MockDriver", "TransportDriver"]
