"""The split virtqueue's walk over rings the guest wrote: descriptor tables, indirect tables,
chains and loops, available and used indexes, event indexes.

An input is a queue set-up and the guest RAM it lies in::

    size            u16   the queue size the driver wrote (any value: the layout check judges it)
    flags           u8    bit 0 EVENT_IDX, bit 1 set up through restore() instead of registers
    desc, avail, used     each a u8 kind and a u32: an offset into RAM region 0 or 1, a raw
                          32-bit address, or an address just below 2**64
    last_avail_idx  u16
    next_used_idx   u16
    pops            u8    how many chains to take (and give back)
    image 0 length  u16, then the bytes of RAM region 0 from its start
    the rest        the bytes of RAM region 1 from its start

RAM is two regions with a hole between them, in guarded memory.
"""

from __future__ import annotations

import struct

from kvmpy.errors import GuestError
from kvmpy.fuzz.guarded_memory import GuardedMemory
from kvmpy.fuzz.harness import KnownIssue, Reader, Writer, check
from kvmpy.testing.virtio_driver import Buffer, MockDriver
from kvmpy.virtio.queue import (
    DESC_F_INDIRECT,
    DESC_F_WRITE,
    DESCRIPTOR_SIZE,
    MAX_INDIRECT,
    DescriptorChain,
    QueueState,
    SplitQueue,
)

RAM0 = (0, 0x10000)
RAM1 = (0x100000, 0x4000)
MAX_QUEUE = 256
MAX_POPS = 64
_DESCRIPTOR = struct.Struct("<QIHH")


def address(kind: int, value: int) -> int:
    """An address of the given kind (see the module docstring)."""
    kind %= 4
    if kind == 0:
        return value % RAM0[1]
    if kind == 1:
        return RAM1[0] + value % RAM1[1]
    if kind == 2:
        return value
    return (1 << 64) - 1 - (value & 0xFFF)


class VirtqueueTarget:
    name = "virtqueue"
    max_len = 16384
    invariants = (
        "only QueueError (a GuestError) escapes the queue; restore() refuses bad state with ValueError",
        "every buffer of a chain lies inside guest RAM and is one the driver described: a "
        "descriptor of the ring's table or of an indirect table that table points at",
        "a chain has at most queue size + MAX_INDIRECT buffers and its head is inside the queue",
        "a pop never reports more pending chains than the queue holds",
        "the device writes nothing but the used ring (and avail_event there): every other byte "
        "of RAM is as the driver left it",
        "push puts (head, length) in the used ring and publishes the used index",
        "with EVENT_IDX, avail_event follows the device's available index",
        "the guard pages around RAM are untouched",
    )
    known: tuple[KnownIssue, ...] = ()

    def __init__(self) -> None:
        self.mem = GuardedMemory([RAM0, RAM1])

    def run(self, data: bytes) -> None:
        mem, reader = self.mem, Reader(data)
        size, flags = reader.u16(), reader.u8()
        addresses = [address(reader.u8(), reader.u32()) for _ in range(3)]
        last_avail, next_used, pops = reader.u16(), reader.u16(), min(reader.u8(), MAX_POPS)
        mem.clear()
        image0 = reader.take(min(reader.u16(), RAM0[1]))
        mem.write(RAM0[0], image0)
        mem.write(RAM1[0], reader.rest()[: RAM1[1]])
        queue = SplitQueue(MAX_QUEUE)
        desc, avail, used = addresses
        state = QueueState(size, True, desc, avail, used, last_avail, next_used, bool(flags & 1))
        if flags & 2:
            try:
                queue.restore(state, mem)
            except ValueError:
                return  # refused, as documented
        else:
            queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = size, *addresses
            queue.last_avail_idx, queue.next_used_idx, queue.event_idx = (
                last_avail,
                next_used,
                bool(flags & 1),
            )
            try:
                queue.check_layout(mem)
            except GuestError:
                return
            queue.ready = True
        before = [bytes(r.view) for r in mem.regions]
        self._described_cache: set[tuple[int, int, bool]] | None = None
        try:
            for _ in range(pops):
                self._pop_and_push(queue)
        except GuestError:
            pass
        self._check_only_used_ring_written(queue, before)
        mem.check_canaries()

    def _pop_and_push(self, queue: SplitQueue) -> None:
        mem = self.mem
        pending = queue.pending(mem)
        check(0 <= pending <= queue.size, f"{pending} chains pending in a queue of {queue.size}")
        chain = queue.pop(mem)
        if chain is None:
            check(pending == 0, "pop found nothing with chains pending")
            return
        self._check_chain(queue, chain)
        if queue.event_idx:
            avail_event = mem.read_u16(queue.device_addr + 4 + 8 * queue.size)
            check(avail_event == queue.last_avail_idx, "avail_event does not follow the available index")
        written = chain.writable_length & 0xFFFF_FFFF
        queue.push(mem, chain.head, written)
        slot = queue.device_addr + 4 + 8 * ((queue.next_used_idx - 1) % queue.size)
        check(struct.unpack("<II", mem.read(slot, 8)) == (chain.head, written), "used element is wrong")
        check(mem.read_u16(queue.device_addr + 2) == queue.next_used_idx, "used index not published")
        check(isinstance(queue.needs_interrupt(mem), bool), "needs_interrupt is not a bool")

    def _check_chain(self, queue: SplitQueue, chain: DescriptorChain) -> None:
        check(0 <= chain.head < queue.size, f"chain head {chain.head} outside a queue of {queue.size}")
        buffers = [(b, False) for b in chain.readable] + [(b, True) for b in chain.writable]
        check(len(buffers) <= queue.size + MAX_INDIRECT, f"a chain of {len(buffers)} buffers")
        for view, writable in buffers:
            check(self.mem.contains_view(view), "a chain buffer lies outside guest RAM")
            if view.nbytes:
                key = (self.mem.gpa_of(view), view.nbytes, writable)
                if self._described_cache is None or key not in self._described_cache:
                    self._described_cache = self._described(queue)  # the used ring may overlap the table
                check(key in self._described_cache, f"buffer {key} is no descriptor the driver wrote")

    def _described(self, queue: SplitQueue) -> set[tuple[int, int, bool]]:
        """(address, length, writable) of every descriptor in the table and its indirect tables."""
        found: set[tuple[int, int, bool]] = set()
        table = self.mem.read(queue.desc_addr, DESCRIPTOR_SIZE * queue.size)
        for addr, length, flags, _ in _DESCRIPTOR.iter_unpack(table):
            found.add((addr, length, bool(flags & DESC_F_WRITE)))
            count = length // DESCRIPTOR_SIZE
            if flags & DESC_F_INDIRECT and 0 < count <= MAX_INDIRECT and self.mem.is_ram(addr, length):
                indirect = self.mem.read(addr, DESCRIPTOR_SIZE * count)
                found.update(
                    (a, n, bool(f & DESC_F_WRITE)) for a, n, f, _ in _DESCRIPTOR.iter_unpack(indirect)
                )
        return found

    def _check_only_used_ring_written(self, queue: SplitQueue, before: list[bytes]) -> None:
        used_start, used_end = queue.device_addr, queue.device_addr + 6 + 8 * queue.size
        for region, old in zip(self.mem.regions, before, strict=True):
            new = bytes(region.view)
            if new == old:
                continue
            lo, hi = max(used_start - region.gpa, 0), min(used_end - region.gpa, region.size)
            outside_old = old[:lo] + old[hi:] if lo < hi else old
            outside_new = new[:lo] + new[hi:] if lo < hi else new
            check(outside_old == outside_new, f"RAM outside the used ring changed in region {region.gpa:#x}")

    def seeds(self) -> list[bytes]:
        seeds = []
        for size, event_idx, indirect in ((16, False, False), (16, True, True), (256, True, False)):
            mem = GuardedMemory([RAM0, RAM1])
            queue = SplitQueue(MAX_QUEUE)
            driver = MockDriver(mem, queue, 0x1000, size=size, indirect_slots=4)
            driver.add([Buffer(0x8000, 16), Buffer(0x9000, 512, writable=True), Buffer(0x9800, 1, True)])
            driver.add([Buffer(RAM1[0], 64, writable=True)], indirect=indirect)
            driver.add([Buffer(0xA000, 100), Buffer(RAM1[0] + 0x100, 200)], indirect=indirect)
            image0 = bytes(mem.regions[0].view).rstrip(b"\0")
            out = Writer().u16(size).u8(int(event_idx))
            for value in (driver.desc, driver.avail, driver.used):
                out.u8(0).u32(value)
            out.u16(0).u16(0).u8(4).u16(len(image0)).raw(image0)
            seeds.append(out.bytes())
            mem.close()
        return seeds


FACTORIES = {"virtqueue": VirtqueueTarget}

__all__ = ["FACTORIES", "VirtqueueTarget", "address"]
