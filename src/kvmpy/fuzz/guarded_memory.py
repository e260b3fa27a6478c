"""Guest RAM with canaries: every region sits between guard pages whose bytes are checked.

The regions are ordinary :class:`~kvmpy.memory.guest_memory.MemoryRegion`
views, but each view is the middle of a larger mapping: a guard page before
and after it, filled with a pattern. A device, a queue or a loader that
writes past the end of a view it was handed (an offset computed wrongly, a
view sliced from the region's mapping instead of the region) changes a
guard byte, and :meth:`GuardedMemory.check_canaries` says where. Two
regions with a hole between them, as guest RAM has around the MMIO hole,
put a boundary inside the fuzzed address range.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from collections.abc import Sequence

from kvmpy.fuzz.harness import check
from kvmpy.memory.guest_memory import GuestMemory, MemoryRegion

GUARD = mmap.PAGESIZE
PATTERN = bytes([0xA5, 0x5A, 0xC3, 0x3C]) * (GUARD // 4)


class GuardedMemory(GuestMemory):
    """A GuestMemory whose regions are fenced by guard pages of a known pattern."""

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        self._mappings: list[mmap.mmap] = []
        regions = []
        for gpa, size in ranges:
            mapping = mmap.mmap(-1, GUARD + size + GUARD)
            mapping[:GUARD] = PATTERN
            mapping[GUARD + size :] = PATTERN
            self._mappings.append(mapping)
            regions.append(MemoryRegion(gpa, size, mapping, memoryview(mapping)[GUARD : GUARD + size]))
        super().__init__(regions)

    def check_canaries(self) -> None:
        for mapping, region in zip(self._mappings, self.regions, strict=True):
            if mapping[:GUARD] == PATTERN and mapping[GUARD + region.size :] == PATTERN:
                continue  # the common case, without formatting the messages below
            before, after = mapping[:GUARD], mapping[GUARD + region.size :]
            check(before == PATTERN, f"the guard page below RAM at {region.gpa:#x} was written")
            check(after == PATTERN, f"the guard page above RAM ending at {region.end:#x} was written")

    def clear(self) -> None:
        """Zero all of RAM (not the guards), for the next input."""
        for region in self.regions:
            region.view[:] = _zeros(region.size)

    def gpa_of(self, view: memoryview) -> int | None:
        """The guest-physical address of a non-empty ``view`` if it lies inside one region's RAM."""
        start = _address(view)
        for region in self.regions:
            base = _address(region.view)
            if base <= start and start + view.nbytes <= base + region.size:
                return region.gpa + start - base
        return None

    def contains_view(self, view: memoryview) -> bool:
        """Whether ``view`` lies entirely inside one region's RAM (host addresses compared)."""
        return view.nbytes == 0 or self.gpa_of(view) is not None


@functools.cache
def _zeros(size: int) -> bytes:
    """``size`` zero bytes, made once: clear() runs before every input."""
    return bytes(size)


def _address(view: memoryview) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


__all__ = ["GUARD", "GuardedMemory"]
