"""A minimal guest-side virtio driver over GuestMemory, for testing device models.

It lays out a split virtqueue in guest memory, publishes chains (direct or
through an indirect table) and collects used entries, the way a guest
driver would, so device models can be exercised without a guest or KVM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.queue import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, SplitQueue


@dataclass
class Buffer:
    address: int
    length: int
    writable: bool = False


class MockDriver:
    """Drives one SplitQueue whose rings live at ``base`` in ``mem``."""

    def __init__(self, mem: GuestMemory, queue: SplitQueue, base: int, size: int = 16) -> None:
        self.mem, self.queue, self.size = mem, queue, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 4095) & ~4095
        self.indirect_area = self.used + 4096
        mem.fill(base, self.indirect_area + 4096 - base)
        queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = (
            size,
            self.desc,
            self.avail,
            self.used,
        )
        queue.ready = True
        self._next_desc = 0
        self._avail_idx = 0
        self._used_seen = 0

    def _write_desc(self, table: int, index: int, buffer: Buffer, flags: int, next_index: int) -> None:
        if buffer.writable:
            flags |= DESC_F_WRITE
        self.mem.write(
            table + 16 * index, struct.pack("<QIHH", buffer.address, buffer.length, flags, next_index)
        )

    def add(self, buffers: list[Buffer], *, indirect: bool = False) -> int:
        """Publish one chain; returns its head descriptor index."""
        head = self._next_desc % self.size
        if indirect:
            for i, buffer in enumerate(buffers):
                last = i == len(buffers) - 1
                self._write_desc(self.indirect_area, i, buffer, 0 if last else DESC_F_NEXT, i + 1)
            table = Buffer(self.indirect_area, 16 * len(buffers))
            self._write_desc(self.desc, head, table, DESC_F_INDIRECT, 0)
            self._next_desc += 1
        else:
            for i, buffer in enumerate(buffers):
                index = (head + i) % self.size
                last = i == len(buffers) - 1
                self._write_desc(
                    self.desc, index, buffer, 0 if last else DESC_F_NEXT, (index + 1) % self.size
                )
            self._next_desc += len(buffers)
        self.mem.write_u16(self.avail + 4 + 2 * (self._avail_idx % self.size), head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail + 2, self._avail_idx)
        return head

    def used_entries(self) -> list[tuple[int, int]]:
        """New (head, length) entries in the used ring since the last call."""
        index = self.mem.read_u16(self.used + 2)
        entries = []
        while self._used_seen != index:
            slot = self.used + 4 + 8 * (self._used_seen % self.size)
            entries.append(struct.unpack("<II", self.mem.read(slot, 8)))
            self._used_seen = (self._used_seen + 1) & 0xFFFF
        return entries


__all__ = ["Buffer", "MockDriver"]
