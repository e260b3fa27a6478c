"""The split virtqueue (virtio 1.x, 2.7): the device side of the rings in guest memory.

The driver publishes descriptor chains in the available ring; the device
walks them, does the work and returns them through the used ring. All three
areas are guest memory, so everything read from them is untrusted: indexes
are checked against the queue size, chains are bounded (no loops, no
indirect table inside an indirect table), and every buffer is checked to lie
in guest RAM before a memoryview of it is handed to a device. A violation
raises :class:`QueueError`; the transport marks the device as needing reset.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmpy.errors import GuestError, RestoreError
from kvmpy.memory.guest_memory import GuestMemory, GuestMemoryError

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
DESCRIPTOR_SIZE = 16
_DESCRIPTOR = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEMENT = struct.Struct("<II")  # id, len
MAX_QUEUE_SIZE = 32768
#: An indirect table may not be larger than this many descriptors.
MAX_INDIRECT = 1024


class QueueError(GuestError):
    """The driver broke the virtqueue rules."""


@dataclass(slots=True)
class DescriptorChain:
    """One request: the head index and its buffers, split into device-readable and -writable."""

    head: int
    readable: list[memoryview] = field(default_factory=list)
    writable: list[memoryview] = field(default_factory=list)

    @property
    def readable_length(self) -> int:
        return sum(map(len, self.readable))

    @property
    def writable_length(self) -> int:
        return sum(map(len, self.writable))

    def read_all(self) -> bytes:
        return b"".join(bytes(b) for b in self.readable)


@dataclass(frozen=True, slots=True)
class QueueState:
    size: int
    ready: bool
    desc_addr: int
    driver_addr: int
    device_addr: int
    last_avail_idx: int
    next_used_idx: int
    event_idx: bool
    #: The used index when the driver was last considered for an interrupt (event-index
    #: suppression); None: the next push interrupts unconditionally.
    signalled_used: int | None = None


class SplitQueue:
    """Device-side state of one split virtqueue."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = max_size
        self.ready = False
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0
        self.last_avail_idx = 0
        self.next_used_idx = 0
        self.event_idx = False
        #: The used index when the driver was last considered for an interrupt; None after
        #: a restore, when the next push interrupts unconditionally (a spurious one is harmless).
        self._signalled_used: int | None = 0
        #: The layout the ring views below were looked up for (see :meth:`_locate`).
        self._located_for: tuple[object, ...] | None = None
        self._desc_view = self._avail_view = self._used_view = memoryview(b"")
        self._desc_at = self._avail_at = self._used_at = 0

    def reset(self) -> None:
        self.__init__(self.max_size)  # type: ignore[misc]

    # --- ring accessors ----------------------------------------------------------------
    def _locate(self, mem: GuestMemory) -> None:
        """Find the three ring areas in guest RAM, once per layout rather than per access.

        The transport lets the driver move the rings or resize the queue only while it is
        disabled, so a lookup stays valid until one of the addresses, the size or the
        memory changes; each access is then a struct call on a region view at an offset.
        """
        layout = (mem, self.size, self.desc_addr, self.driver_addr, self.device_addr)
        if layout == self._located_for:
            return
        self._desc_view, self._desc_at = self._area(mem, self.desc_addr, DESCRIPTOR_SIZE * self.size)
        self._avail_view, self._avail_at = self._area(mem, self.driver_addr, 6 + 2 * self.size)
        self._used_view, self._used_at = self._area(mem, self.device_addr, 6 + 8 * self.size)
        self._located_for = layout

    @staticmethod
    def _area(mem: GuestMemory, address: int, length: int) -> tuple[memoryview, int]:
        try:
            return mem.locate(address, length)
        except GuestMemoryError:
            raise QueueError(f"virtqueue area {address:#x}+{length:#x} is not guest RAM") from None

    @staticmethod
    def _table(mem: GuestMemory, address: int, count: int) -> memoryview:
        """A view of ``count`` descriptors at ``address`` (an indirect table)."""
        try:
            return mem.slice(address, DESCRIPTOR_SIZE * count)
        except GuestMemoryError:
            raise QueueError(f"descriptor table at {address:#x} is not guest RAM") from None

    def check_layout(self, mem: GuestMemory) -> None:
        """Raise QueueError unless all three ring areas lie in guest RAM and the size is valid."""
        if not 0 < self.size <= self.max_size or self.size & (self.size - 1):
            raise QueueError(f"queue size {self.size} is not a power of two up to {self.max_size}")
        self._locate(mem)

    # --- device operations -------------------------------------------------------------
    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver has made available that the device has not taken."""
        self._locate(mem)
        avail_idx = _U16.unpack_from(self._avail_view, self._avail_at + 2)[0]
        count = (avail_idx - self.last_avail_idx) & 0xFFFF
        if count > self.size:
            raise QueueError(f"available index ran {count} entries ahead of a queue of {self.size}")
        return count

    def has_work(self, mem: GuestMemory) -> bool:
        """Whether :meth:`pop` would return a chain (checked before a rate limiter is asked)."""
        return self.ready and self.pending(mem) > 0

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None."""
        if not self.ready or self.pending(mem) == 0:
            return None
        slot = self._avail_at + 4 + 2 * (self.last_avail_idx % self.size)
        head = _U16.unpack_from(self._avail_view, slot)[0]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:  # avail_event: kick me again after this index
            _store_u16(self._used_view, self._used_at + 4 + 8 * self.size, self.last_avail_idx)
        return self._walk(mem, head)

    def unpop(self, count: int = 1) -> None:
        """Give back the ``count`` chains just popped (the device could not use them yet)."""
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF

    def _walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        """The chain at ``head``: at most ``size`` buffers (virtio 1.x, 2.7.5.3.1: a driver must
        not make a chain longer than the queue), which also bounds every device's iovec count
        below IOV_MAX (1024) and ends any loop."""
        if head >= self.size:
            raise QueueError(f"descriptor head {head} is outside a queue of {self.size}")
        chain = DescriptorChain(head)
        # Descriptors unpacked from a view of their table: no guest-memory lookup per descriptor.
        table, table_at, table_size, index = self._desc_view, self._desc_at, self.size, head
        unpack = _DESCRIPTOR.unpack_from
        in_indirect = False
        buffers = 0
        for _ in range(self.size + 2):  # each step adds a buffer, but the one into a table
            addr, length, flags, next_index = unpack(table, table_at + DESCRIPTOR_SIZE * index)
            if flags & DESC_F_INDIRECT:
                if in_indirect:
                    raise QueueError("indirect descriptor inside an indirect table")
                if length % DESCRIPTOR_SIZE or not 0 < length // DESCRIPTOR_SIZE <= MAX_INDIRECT:
                    raise QueueError(f"indirect table of {length} bytes")
                table_size, index, in_indirect = length // DESCRIPTOR_SIZE, 0, True
                table, table_at = self._table(mem, addr, table_size), 0
                continue
            buffers += 1
            if buffers > self.size:
                raise QueueError(f"descriptor chain longer than the queue size {self.size} (or it loops)")
            try:
                buffer = mem.slice(addr, length)
            except GuestMemoryError:
                raise QueueError(f"descriptor buffer {addr:#x}+{length:#x} is not guest RAM") from None
            (chain.writable if flags & DESC_F_WRITE else chain.readable).append(buffer)
            if not flags & DESC_F_NEXT:
                return chain
            if next_index >= table_size:
                raise QueueError(f"descriptor next {next_index} is outside its table of {table_size}")
            index = next_index
        raise QueueError("descriptor chain loops")  # not reached: the buffer count stops it first

    def push(self, mem: GuestMemory, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes filled in."""
        self._locate(mem)
        used, at = self._used_view, self._used_at
        _USED_ELEMENT.pack_into(used, at + 4 + 8 * (self.next_used_idx % self.size), head, written)
        self.next_used_idx = (self.next_used_idx + 1) & 0xFFFF
        _store_u16(used, at + 2, self.next_used_idx)  # after the entry: x86 keeps store order

    def push_many(self, mem: GuestMemory, used: Sequence[tuple[int, int]]) -> None:
        """Return several chains (head, written) under one used index: the driver sees all of
        them at once, as the buffers of one merged virtio-net packet must be seen."""
        self._locate(mem)
        view, at, size, index = self._used_view, self._used_at, self.size, self.next_used_idx
        for head, written in used:
            _USED_ELEMENT.pack_into(view, at + 4 + 8 * (index % size), head, written)
            index = (index + 1) & 0xFFFF
        self.next_used_idx = index
        _store_u16(view, at + 2, index)

    def needs_interrupt(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last one."""
        self._locate(mem)
        old, new = self._signalled_used, self.next_used_idx
        self._signalled_used = new
        if old is None:
            return True
        if self.event_idx:
            used_event = _U16.unpack_from(self._avail_view, self._avail_at + 4 + 2 * self.size)[0]
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        flags = _U16.unpack_from(self._avail_view, self._avail_at)[0]
        return not flags & AVAIL_F_NO_INTERRUPT

    def take_over(self, mem: GuestMemory) -> None:
        """Go on from where another implementation of the device (a vhost-user back end) left
        the ring: its used index is in guest memory, and what lies between it and the
        available index is taken to be not done yet. The next push interrupts."""
        self._locate(mem)
        used = _U16.unpack_from(self._used_view, self._used_at + 2)[0]
        self.next_used_idx = self.last_avail_idx = used
        self._signalled_used = None

    def continue_from(self, mem: GuestMemory, next_avail: int) -> None:
        """Go on from where a back end that stopped cleanly left the ring: it took the chains
        up to ``next_avail`` and published its used index in guest memory. The next push
        interrupts."""
        self._locate(mem)
        self.last_avail_idx = next_avail & 0xFFFF
        self.next_used_idx = _U16.unpack_from(self._used_view, self._used_at + 2)[0]
        self._signalled_used = None

    # --- state -------------------------------------------------------------------------
    def save(self) -> QueueState:
        return QueueState(
            self.size, self.ready, self.desc_addr, self.driver_addr, self.device_addr,
            self.last_avail_idx, self.next_used_idx, self.event_idx, self._signalled_used,
        )  # fmt: skip

    def restore(self, state: QueueState, mem: GuestMemory) -> None:
        """Load ``state``, checked as untrusted: a ready queue's rings must lie in ``mem``
        (the restored guest RAM), every index must be a 16-bit value."""
        if not 0 < state.size <= self.max_size or state.size & (state.size - 1):
            limit = self.max_size
            raise RestoreError(f"saved virtqueue size {state.size} is not a power of two up to {limit}")
        indexes = (state.last_avail_idx, state.next_used_idx, state.signalled_used or 0)
        if not all(0 <= index <= 0xFFFF for index in indexes):
            raise RestoreError("saved virtqueue indexes are not 16-bit values")
        addresses = (state.desc_addr, state.driver_addr, state.device_addr)
        if not all(0 <= address < 1 << 64 for address in addresses):
            raise RestoreError("saved virtqueue ring addresses are not 64-bit values")
        if state.ready:
            for address, length, what in (
                (state.desc_addr, DESCRIPTOR_SIZE * state.size, "descriptor table"),
                (state.driver_addr, 6 + 2 * state.size, "available ring"),
                (state.device_addr, 6 + 8 * state.size, "used ring"),
            ):
                if not mem.is_ram(address, length):
                    raise RestoreError(f"saved virtqueue {what} {address:#x}+{length:#x} is not guest RAM")
        self.size, self.ready = state.size, state.ready
        self.desc_addr, self.driver_addr, self.device_addr = addresses
        self.last_avail_idx, self.next_used_idx = state.last_avail_idx, state.next_used_idx
        self.event_idx = state.event_idx
        self._signalled_used = state.signalled_used
        self._located_for = None


def _store_u16(view: memoryview, offset: int, value: int) -> None:
    """Store a ring index the driver may be reading at this moment, in one 2-byte copy.

    Not ``struct.pack_into``: CPython zero-fills its target before packing, so a driver
    polling the used index could read 0 in between (a test guest did, about once in a
    thousand completions, and took its used index for having jumped back), and a zero
    avail_event could make a driver skip the kick the device waits for.
    """
    view[offset : offset + 2] = value.to_bytes(2, "little")


__all__ = ["DescriptorChain", "QueueError", "QueueState", "SplitQueue"]
