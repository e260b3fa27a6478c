"""KVM's coalesced MMIO/PIO ring: guest writes the kernel buffered instead of exiting.

For a zone registered with KVM_REGISTER_COALESCED_MMIO, a guest write does not
leave KVM_RUN: the kernel appends it to a ring in a page of the vCPU mapping
(shared by all vCPUs of the VM) and re-enters the guest. The VMM replays the
ring, in order, before it handles the next exit, so a device whose writes only
matter when something is next read (PCI's 0xCF8 address latch) behaves as if
every write had exited. QEMU does the same for 0xCF8 and the RTC index port.
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator
from dataclasses import dataclass

from kvmpy.abi import kvm as abi

_ENTRY_SIZE = ctypes.sizeof(abi.kvm_coalesced_mmio)
_HEADER_SIZE = abi.kvm_coalesced_mmio_ring.coalesced_mmio.offset


@dataclass(frozen=True, slots=True)
class CoalescedWrite:
    """One buffered write: a port (``is_pio``) or guest-physical address, and its bytes."""

    is_pio: bool
    address: int
    data: bytes


class CoalescedRing:
    """The ring page at KVM_COALESCED_MMIO_PAGE_OFFSET of a vCPU mapping.

    The kernel produces at ``last``; the VMM consumes at ``first``. Callers
    serialize :meth:`drain` (the ring is one per VM, every vCPU thread drains it).
    """

    def __init__(self, mapping: mmap.mmap, offset: int) -> None:
        self.capacity = (mmap.PAGESIZE - _HEADER_SIZE) // _ENTRY_SIZE
        self._ring = abi.kvm_coalesced_mmio_ring.from_buffer(mapping, offset)
        self._entries = (abi.kvm_coalesced_mmio * self.capacity).from_buffer(mapping, offset + _HEADER_SIZE)
        # ``first`` and ``last`` as two 32-bit words: ``pending`` runs at every exit, and two
        # memoryview reads cost less than two ctypes field reads.
        assert abi.kvm_coalesced_mmio_ring.first.offset == 0 and abi.kvm_coalesced_mmio_ring.last.offset == 4
        #: ``first`` and ``last`` (``pending`` is ``indices[0] != indices[1]``, which the vCPU
        #: loop reads itself at every exit).
        self.indices = memoryview(mapping)[offset : offset + 8].cast("I")

    def pending(self) -> bool:
        indices = self.indices
        return indices[0] != indices[1]

    def drain(self) -> Iterator[CoalescedWrite]:
        """Yield the buffered writes oldest first, freeing each slot as it goes."""
        ring, entries, capacity = self._ring, self._entries, self.capacity
        while ring.first != ring.last:
            entry = entries[ring.first % capacity]
            length = min(int(entry.len), len(entry.data))
            write = CoalescedWrite(bool(entry.pio), int(entry.phys_addr), bytes(entry.data[:length]))
            ring.first = (ring.first + 1) % capacity
            yield write

    def close(self) -> None:
        """Drop the ctypes views so the vCPU mapping can be unmapped."""
        del self._ring, self._entries
        self.indices.release()


__all__ = ["CoalescedRing", "CoalescedWrite"]
