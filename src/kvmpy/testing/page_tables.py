"""Build x86 page tables in guest memory, for tests of the page-table walk and the monitor.

A deliberately plain writer: it knows each mode's geometry as a table of
(address bit where the index starts, index width, entry size) and writes
entries top-down, allocating tables from a bump allocator in a given range of
guest RAM. It shares no code with :mod:`kvmpy.memory.page_walk`, so tests can
check the walk against what was written here.
"""

from __future__ import annotations

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.memory.page_walk import PagingMode

#: Per mode: (first index bit, index width, entry size) of each level, top-down.
GEOMETRY: dict[PagingMode, tuple[tuple[int, int, int], ...]] = {
    PagingMode.LEVEL5: ((48, 9, 8), (39, 9, 8), (30, 9, 8), (21, 9, 8), (12, 9, 8)),
    PagingMode.LEVEL4: ((39, 9, 8), (30, 9, 8), (21, 9, 8), (12, 9, 8)),
    PagingMode.PAE: ((30, 2, 8), (21, 9, 8), (12, 9, 8)),
    PagingMode.BITS32: ((22, 10, 4), (12, 10, 4)),
}

TABLE_FLAGS = 0x7  # present, writable, user: the rights a table entry passes down unchanged


class PageTableBuilder:
    """Writes the tables of one address space; ``cr3`` is the root to load."""

    def __init__(self, memory: GuestMemory, mode: PagingMode, area_start: int, area_size: int) -> None:
        self.memory = memory
        self.mode = mode
        self._next = area_start
        self._end = area_start + area_size
        self.cr3 = self._allocate(32 if mode is PagingMode.PAE else 4096)

    def _allocate(self, size: int) -> int:
        address = self._next
        if address + 4096 > self._end:
            raise MemoryError("the page-table area is full")
        self._next += 4096  # every table on its own page, even PAE's 32-byte PDPT
        self.memory.fill(address, 4096)
        return address

    def _read(self, address: int, size: int) -> int:
        return self.memory.read_u64(address) if size == 8 else self.memory.read_u32(address)

    def _write(self, address: int, size: int, value: int) -> None:
        if size == 8:
            self.memory.write_u64(address, value)
        else:
            self.memory.write_u32(address, value)

    def entry_address(self, gva: int, depth: int) -> int:
        """Where the entry for ``gva`` at ``depth`` (0 = the top table) lives; tables must exist."""
        table = self.cr3
        for level, (shift, bits, size) in enumerate(GEOMETRY[self.mode]):
            address = table + ((gva >> shift) & ((1 << bits) - 1)) * size
            if level == depth:
                return address
            table = self._read(address, size) & 0x000F_FFFF_FFFF_F000
        raise ValueError(f"depth {depth} is below the last level")

    def map(
        self, gva: int, gpa: int, page_size: int, flags: int = 0x3, table_flags: int = TABLE_FLAGS
    ) -> None:
        """Map the page of ``page_size`` bytes at ``gva`` to ``gpa``: ``flags`` go in the leaf
        entry (PS is added for a large page), ``table_flags`` in any table entry created."""
        table = self.cr3
        for shift, bits, size in GEOMETRY[self.mode]:
            address = table + ((gva >> shift) & ((1 << bits) - 1)) * size
            if 1 << shift == page_size:
                large = 0x80 if page_size > 4096 else 0
                if self.mode is PagingMode.BITS32 and page_size == 1 << 22:
                    value = (gpa & 0xFFC0_0000) | ((gpa >> 32) & 0xFF) << 13
                else:
                    value = gpa
                self._write(address, size, value | flags | large)
                return
            entry = self._read(address, size)
            if not entry & 1:
                child = self._allocate(4096)
                # PAE's PDPTEs have no RW/US bits (they are reserved): only P.
                rights = 0x1 if self.mode is PagingMode.PAE and shift == 30 else table_flags
                self._write(address, size, child | rights)
                entry = child | rights
            table = entry & 0x000F_FFFF_FFFF_F000 & (0xFFFF_F000 if size == 4 else ~0)
        raise ValueError(f"page size {page_size:#x} does not exist in {self.mode.value} paging")


__all__ = ["GEOMETRY", "PageTableBuilder"]
