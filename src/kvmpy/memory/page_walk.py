"""The x86 guest page-table walk: guest-virtual address (GVA) to guest-physical (GPA).

This is what the MMU does on a TLB miss, done in the VMM from the guest's own
tables in guest RAM: start at CR3, take an index from the address at each
level, read the entry, follow it to the next table or stop at a page. It
covers every mode a PC guest can be in: paging off (GVA = GPA), 32-bit
paging (with 4 MiB pages under CR4.PSE), PAE, 4-level and 5-level (CR4.LA57)
long-mode paging with 2 MiB and 1 GiB pages (Intel SDM vol. 3A ch. 4, AMD APM
vol. 2 ch. 5).

Every value comes from the guest, so nothing is trusted: the walk is at most
five reads, every table address is checked against guest RAM before it is
read, and reserved bits are checked as the CPU checks them. A walk that
cannot finish says where it stopped and why, with the levels it did read.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

from kvmpy.errors import GuestError
from kvmpy.memory.guest_memory import GuestMemory

# Control-register and EFER bits that choose the paging mode.
CR0_PG = 1 << 31
CR0_WP = 1 << 16
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
CR4_PKE = 1 << 22
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

# Paging-structure entry bits.
PRESENT = 1 << 0
WRITABLE = 1 << 1
USER = 1 << 2
PWT = 1 << 3
PCD = 1 << 4
ACCESSED = 1 << 5
DIRTY = 1 << 6
PAGE_SIZE = 1 << 7  # PS in directory entries; PAT in a 4 KiB page-table entry
GLOBAL = 1 << 8
LARGE_PAT = 1 << 12  # PAT bit of a 2 MiB, 4 MiB or 1 GiB page
NO_EXECUTE = 1 << 63

#: MAXPHYADDR when the caller does not know the CPU's (the architectural maximum).
DEFAULT_MAX_PHYS_BITS = 52

KIB4 = 1 << 12
MIB2 = 1 << 21
MIB4 = 1 << 22
GIB1 = 1 << 30


class PagingMode(Enum):
    """How the CPU turns a linear address into a physical one."""

    OFF = "off"
    BITS32 = "32-bit"
    PAE = "PAE"
    LEVEL4 = "4-level"
    LEVEL5 = "5-level"


def paging_mode(cr0: int, cr4: int, efer: int) -> PagingMode:
    """The paging mode CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57 select (SDM table 4-1)."""
    if not cr0 & CR0_PG:
        return PagingMode.OFF
    if not cr4 & CR4_PAE:
        return PagingMode.BITS32
    if not efer & EFER_LMA:
        return PagingMode.PAE
    return PagingMode.LEVEL5 if cr4 & CR4_LA57 else PagingMode.LEVEL4


class PageWalkError(GuestError):
    """A guest-virtual address has no translation (the walk says where it stopped)."""


@dataclass(frozen=True, slots=True)
class PagingContext:
    """The register state a walk depends on."""

    mode: PagingMode
    cr3: int
    #: EFER.NXE: bit 63 is the no-execute bit; without it that bit is reserved.
    nx_enabled: bool = False
    #: CR4.PSE: 4 MiB pages in 32-bit paging.
    pse: bool = False
    #: The CPU's physical address width (CPUID 0x80000008 EAX[7:0]); bits above are reserved.
    max_phys_bits: int = DEFAULT_MAX_PHYS_BITS
    #: 1 GiB pages (CPUID 0x80000001 EDX bit 26); without them PS in a PDPT entry is reserved.
    gib_pages: bool = True

    @classmethod
    def from_registers(
        cls,
        cr0: int,
        cr3: int,
        cr4: int,
        efer: int,
        max_phys_bits: int = DEFAULT_MAX_PHYS_BITS,
        gib_pages: bool = True,
    ) -> PagingContext:
        return cls(
            mode=paging_mode(cr0, cr4, efer),
            cr3=cr3,
            nx_enabled=bool(efer & EFER_NXE),
            pse=bool(cr4 & CR4_PSE),
            max_phys_bits=max_phys_bits,
            gib_pages=gib_pages,
        )


@dataclass(frozen=True, slots=True)
class WalkStep:
    """One level of a walk: the table, the index taken from the address, the entry found."""

    level: int
    table_name: str
    table: int
    index: int
    entry_address: int
    entry: int
    entry_size: int
    #: Names of the flag bits set in the entry (only the bits this kind of entry defines).
    flags: tuple[str, ...]
    #: "table" (points to the next level), a page size such as "2 MiB page", or "not present".
    maps: str
    #: Bits 62:59 of a 4- or 5-level page entry (used when CR4.PKE is set), else None.
    protection_key: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "table_name": self.table_name,
            "table": self.table,
            "index": self.index,
            "entry_address": self.entry_address,
            "entry": self.entry,
            "entry_size": self.entry_size,
            "flags": list(self.flags),
            "maps": self.maps,
            "protection_key": self.protection_key,
        }


@dataclass(frozen=True, slots=True)
class Walk:
    """The result of walking ``gva``: every level read, and the GPA or why there is none."""

    gva: int
    mode: PagingMode
    cr3: int
    steps: tuple[WalkStep, ...]
    gpa: int | None
    page_size: int | None
    #: Effective permissions of the page (every level must allow it; NX at any level forbids).
    writable: bool = False
    user: bool = False
    executable: bool = False
    fault: str | None = None

    @property
    def ok(self) -> bool:
        return self.gpa is not None

    def require(self) -> int:
        """The GPA, or PageWalkError saying where the walk stopped."""
        if self.gpa is None:
            raise PageWalkError(f"GVA {self.gva:#x}: {self.fault}")
        return self.gpa

    def as_dict(self) -> dict[str, Any]:
        return {
            "gva": self.gva,
            "mode": self.mode.value,
            "cr3": self.cr3,
            "steps": [step.as_dict() for step in self.steps],
            "gpa": self.gpa,
            "page_size": self.page_size,
            "writable": self.writable,
            "user": self.user,
            "executable": self.executable,
            "fault": self.fault,
        }


@dataclass(frozen=True, slots=True)
class _Level:
    """One level of a paging mode's tables."""

    name: str
    shift: int  # the address bits this level's index starts at
    index_bits: int
    entry_size: int
    #: The page an entry maps with PS set (None: PS is reserved or means PAT at this level).
    large_page: int | None


_LONG_MODE_LEVELS = (
    _Level("PML5", 48, 9, 8, None),
    _Level("PML4", 39, 9, 8, None),
    _Level("PDPT", 30, 9, 8, GIB1),
    _Level("PD", 21, 9, 8, MIB2),
    _Level("PT", 12, 9, 8, None),
)
_PAE_LEVELS = (
    _Level("PDPT", 30, 2, 8, None),
    _Level("PD", 21, 9, 8, MIB2),
    _Level("PT", 12, 9, 8, None),
)
_BITS32_LEVELS = (
    _Level("PD", 22, 10, 4, MIB4),
    _Level("PT", 12, 10, 4, None),
)


def _levels(mode: PagingMode) -> tuple[_Level, ...]:
    if mode is PagingMode.LEVEL5:
        return _LONG_MODE_LEVELS
    if mode is PagingMode.LEVEL4:
        return _LONG_MODE_LEVELS[1:]
    if mode is PagingMode.PAE:
        return _PAE_LEVELS
    if mode is PagingMode.BITS32:
        return _BITS32_LEVELS
    raise ValueError(f"paging mode {mode.value} has no tables")


def _size_name(size: int) -> str:
    if size >= GIB1:
        return f"{size >> 30} GiB page"
    if size >= 1 << 20:
        return f"{size >> 20} MiB page"
    return f"{size >> 10} KiB page"


def _canonical_fault(gva: int, mode: PagingMode) -> str | None:
    """Why ``gva`` is not a valid linear address in ``mode``, or None if it is."""
    if gva < 0 or gva >= 1 << 64:
        return "not a 64-bit address"
    if mode in (PagingMode.OFF, PagingMode.BITS32, PagingMode.PAE):
        if gva >= 1 << 32:
            return f"linear addresses are 32 bits wide in {mode.value} paging"
        return None
    width = 57 if mode is PagingMode.LEVEL5 else 48
    top = gva >> (width - 1)
    if top not in (0, (1 << (65 - width)) - 1):
        return f"not canonical for {mode.value} paging (bits 63:{width - 1} must all equal bit {width - 1})"
    return None


def _reserved_bits(level: _Level, entry: int, leaf_size: int | None, context: PagingContext) -> int:
    """The reserved bits of ``entry`` that are set (non-zero: the CPU raises #PF with RSVD)."""
    if level.entry_size == 4:  # 32-bit paging: only a 4 MiB page has reserved bits
        if leaf_size == MIB4:
            high = ((entry >> 13) & 0xFF) << 32  # PSE-36: physical address bits 39:32
            limit = min(context.max_phys_bits, 40)
            reserved = entry & (1 << 21)
            if high >> limit:
                reserved |= entry & (0xFF << 13)
            return reserved
        return 0
    reserved = entry & ((1 << 52) - 1) & ~((1 << context.max_phys_bits) - 1)
    if context.mode is PagingMode.PAE and level.name == "PDPT":
        return reserved | entry & (0b110 | 0b1111 << 5 | NO_EXECUTE)
    if not context.nx_enabled:
        reserved |= entry & NO_EXECUTE
    if level.large_page is None and level.name != "PT":
        reserved |= entry & PAGE_SIZE  # PS is reserved in PML5 and PML4 entries
    if leaf_size == GIB1 and not context.gib_pages:
        reserved |= entry & PAGE_SIZE  # a CPU without 1 GiB pages
    if leaf_size is not None and leaf_size > KIB4:
        # Between the PAT bit and the page's address: bits 29:13 (1 GiB) or 20:13 (2 MiB).
        reserved |= entry & (leaf_size - 1) & ~(LARGE_PAT | (KIB4 - 1))
    return reserved


def _flag_names(level: _Level, entry: int, leaf_size: int | None, context: PagingContext) -> tuple[str, ...]:
    """The defined flag bits set in ``entry``, by their SDM names."""
    if context.mode is PagingMode.PAE and level.name == "PDPT":
        named = [(PRESENT, "P"), (PWT, "PWT"), (PCD, "PCD")]
    else:
        named = [(PRESENT, "P"), (WRITABLE, "RW"), (USER, "US"), (PWT, "PWT"), (PCD, "PCD"), (ACCESSED, "A")]
        if leaf_size is None:
            if level.large_page is not None:
                named.append((PAGE_SIZE, "PS"))
        else:
            named.append((DIRTY, "D"))
            if leaf_size == KIB4:
                named.append((PAGE_SIZE, "PAT"))
            else:
                named += [(PAGE_SIZE, "PS"), (LARGE_PAT, "PAT")]
            named.append((GLOBAL, "G"))
        if level.entry_size == 8 and context.nx_enabled:
            named.append((NO_EXECUTE, "NX"))
    return tuple(name for bit, name in named if entry & bit)


def _address_mask(context: PagingContext) -> int:
    return ((1 << context.max_phys_bits) - 1) & ~(KIB4 - 1)


def _first_table(context: PagingContext) -> int:
    if context.mode is PagingMode.PAE:
        return context.cr3 & 0xFFFF_FFE0  # CR3 bits 31:5: the four PDPTEs, 32-byte aligned
    if context.mode is PagingMode.BITS32:
        return context.cr3 & 0xFFFF_F000
    return context.cr3 & _address_mask(context)


def _page_address(entry: int, size: int, context: PagingContext) -> int:
    if size == MIB4:  # PSE-36: bits 31:22 in place, bits 39:32 from entry bits 20:13
        return (entry & 0xFFC0_0000) | (((entry >> 13) & 0xFF) << 32)
    return entry & _address_mask(context) & ~(size - 1)


def walk(memory: GuestMemory, gva: int, context: PagingContext) -> Walk:
    """Translate ``gva`` through the guest's page tables as the CPU would."""
    mode = context.mode
    fault = _canonical_fault(gva, mode)
    if fault is not None:
        return Walk(gva, mode, context.cr3, (), None, None, fault=fault)
    if mode is PagingMode.OFF:
        return Walk(gva, mode, context.cr3, (), gva, None, writable=True, user=True, executable=True)
    steps: list[WalkStep] = []
    table = _first_table(context)
    writable = user = True
    executable = True
    levels = _levels(mode)
    for depth, level in enumerate(levels):
        number = len(levels) - depth
        index = (gva >> level.shift) & ((1 << level.index_bits) - 1)
        entry_address = table + index * level.entry_size
        if not memory.is_ram(entry_address, level.entry_size):
            fault = f"level {number} ({level.name}) table at GPA {table:#x} is outside guest RAM"
            return _stopped(gva, context, steps, fault)
        if level.entry_size == 8:
            entry = memory.read_u64(entry_address)
        else:
            entry = memory.read_u32(entry_address)
        present = bool(entry & PRESENT)
        leaf_size = _leaf_size(level, entry, context) if present else None
        step = WalkStep(
            level=number,
            table_name=level.name,
            table=table,
            index=index,
            entry_address=entry_address,
            entry=entry,
            entry_size=level.entry_size,
            flags=_flag_names(level, entry, leaf_size, context),
            maps=("table" if leaf_size is None else _size_name(leaf_size)) if present else "not present",
            protection_key=(entry >> 59) & 0xF if leaf_size is not None and level.entry_size == 8 else None,
        )
        steps.append(step)
        if not present:
            return _stopped(gva, context, steps, f"not present at level {number} ({level.name}[{index}])")
        reserved = _reserved_bits(level, entry, leaf_size, context)
        if reserved:
            fault = f"reserved bits {reserved:#x} set at level {number} ({level.name}[{index}] = {entry:#x})"
            return _stopped(gva, context, steps, fault)
        if not (mode is PagingMode.PAE and level.name == "PDPT"):  # PAE PDPTEs carry no rights
            writable &= bool(entry & WRITABLE)
            user &= bool(entry & USER)
            if context.nx_enabled and level.entry_size == 8:
                executable &= not entry & NO_EXECUTE
        if leaf_size is not None:
            gpa = _page_address(entry, leaf_size, context) | (gva & (leaf_size - 1))
            return Walk(
                gva, mode, context.cr3, tuple(steps), gpa, leaf_size, writable, user, executable, None
            )
        table = entry & _address_mask(context)
        if level.entry_size == 4:
            table &= 0xFFFF_F000
    raise AssertionError("the last level always maps a page")  # pragma: no cover


def _leaf_size(level: _Level, entry: int, context: PagingContext) -> int | None:
    """The page this present entry maps, or None if it points to another table."""
    if level.name == "PT":
        return KIB4
    if level.large_page is None or not entry & PAGE_SIZE:
        return None
    if level.large_page == MIB4 and not context.pse:
        return None  # without CR4.PSE, 32-bit paging ignores PS
    return level.large_page


def _stopped(gva: int, context: PagingContext, steps: list[WalkStep], fault: str) -> Walk:
    return Walk(gva, context.mode, context.cr3, tuple(steps), None, None, fault=fault)


__all__ = [
    "CR0_PG",
    "CR4_LA57",
    "CR4_PAE",
    "CR4_PSE",
    "EFER_LMA",
    "EFER_NXE",
    "PageWalkError",
    "PagingContext",
    "PagingMode",
    "Walk",
    "WalkStep",
    "paging_mode",
    "walk",
]
