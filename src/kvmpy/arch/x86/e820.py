"""The guest's physical memory map (e820), shared by the PVH and Linux boot paths.

RAM comes from GuestMemory's regions; the legacy hole from the EBDA to 1 MiB
(EBDA, VGA, option ROMs, the BIOS area holding the ACPI tables and MP table)
is reported as reserved so the kernel leaves the firmware tables alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmpy.arch.x86 import layout
from kvmpy.memory.guest_memory import GuestMemory

E820_RAM = 1
E820_RESERVED = 2


@dataclass(frozen=True, slots=True)
class E820Entry:
    address: int
    size: int
    type: int


def build_e820(mem: GuestMemory) -> list[E820Entry]:
    """The e820 table for ``mem``, sorted and without overlaps."""
    entries: list[E820Entry] = []
    for region in mem.regions:
        start, end = region.gpa, region.end
        if start < layout.EBDA_START < end:
            entries.append(E820Entry(start, layout.EBDA_START - start, E820_RAM))
            start = min(max(start, layout.HIGH_MEMORY_START), end)
        elif layout.EBDA_START <= start < layout.HIGH_MEMORY_START:
            start = min(layout.HIGH_MEMORY_START, end)
        if start < end:
            entries.append(E820Entry(start, end - start, E820_RAM))
    entries.append(E820Entry(layout.EBDA_START, layout.HIGH_MEMORY_START - layout.EBDA_START, E820_RESERVED))
    # The PCIe ECAM window: Linux only trusts MCFG when its region is reserved.
    entries.append(E820Entry(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, E820_RESERVED))
    return sorted(entries, key=lambda entry: entry.address)


__all__ = ["E820_RAM", "E820_RESERVED", "E820Entry", "build_e820"]
