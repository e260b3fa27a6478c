"""The boot vCPU's state: GDT, identity page tables and registers for each entry mode.

Three ways in (see ``kvmpy.loader.BootMode``):

* PVH: 32-bit protected mode, paging off, flat segments, EBX = start_info.
* LINUX64: the Linux 64-bit boot protocol, long mode with identity-mapped
  paging, RSI = zero page, CS = __BOOT_CS (0x10), DS = __BOOT_DS (0x18).
* FLAT64: the same long-mode state for a flat binary, with no boot info.

Only the boot vCPU gets this; secondary vCPUs wait for INIT/SIPI from the guest.
"""

from __future__ import annotations

import struct

from kvmpy.abi import kvm as abi
from kvmpy.arch.x86 import layout
from kvmpy.memory.guest_memory import GuestMemory

# Control register and EFER bits.
CR0_PE = 1 << 0
CR0_ET = 1 << 4
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Page-table entry bits.
PTE_PRESENT = 1 << 0
PTE_WRITABLE = 1 << 1
PTE_USER = 1 << 2
PTE_HUGE = 1 << 7

# GDT selectors, matching Linux's boot GDT (__BOOT_CS = 0x10, __BOOT_DS = 0x18).
SELECTOR_CODE32 = 0x08
SELECTOR_CODE64 = 0x10
SELECTOR_DATA = 0x18
SELECTOR_TSS = 0x20

_GDT_ENTRIES = {
    # index: (flags, access) for a flat 4 GiB segment
    SELECTOR_CODE32 >> 3: (0xC, 0x9B),  # G=1 D=1, present code exec/read accessed
    SELECTOR_CODE64 >> 3: (0xA, 0x9B),  # G=1 L=1
    SELECTOR_DATA >> 3: (0xC, 0x93),  # G=1 B=1, present data read/write accessed
    SELECTOR_TSS >> 3: (0x0, 0x8B),  # busy 32/64-bit TSS
}


def gdt_entry(flags: int, access: int, base: int, limit: int) -> int:
    """Encode one 8-byte segment descriptor."""
    return (
        ((base & 0xFF000000) << 32)
        | ((flags & 0xF) << 52)
        | ((limit & 0xF0000) << 32)
        | ((access & 0xFF) << 40)
        | ((base & 0x00FFFFFF) << 16)
        | (limit & 0xFFFF)
    )


def write_gdt(mem: GuestMemory) -> None:
    """The boot GDT at layout.BOOT_GDT_START, and an empty IDT after it."""
    entries = [0] * 5
    for index, (flags, access) in _GDT_ENTRIES.items():
        limit = 0x67 if index == SELECTOR_TSS >> 3 else 0xFFFFF
        entries[index] = gdt_entry(flags, access, 0, limit)
    mem.write(layout.BOOT_GDT_START, struct.pack(f"<{len(entries)}Q", *entries))
    mem.write_u64(layout.BOOT_IDT_START, 0)


def write_identity_page_tables(mem: GuestMemory) -> int:
    """Identity-map the first 4 GiB with 2 MiB pages; returns the PML4 address for CR3."""
    flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER
    mem.write_u64(layout.PML4_START, layout.PDPTE_START | flags)
    for gib in range(4):
        directory = layout.PDE_START + gib * 0x1000
        mem.write_u64(layout.PDPTE_START + gib * 8, directory | flags)
        entries = [((gib << 30) + (i << 21)) | flags | PTE_HUGE for i in range(512)]
        mem.write(directory, struct.pack("<512Q", *entries))
    return layout.PML4_START


def _segment(selector: int, flags: int, access: int, limit: int = 0xFFFFFFFF) -> abi.kvm_segment:
    segment = abi.kvm_segment()
    segment.base = 0
    segment.limit = limit
    segment.selector = selector
    segment.type = access & 0xF
    segment.present = (access >> 7) & 1
    segment.dpl = (access >> 5) & 3
    segment.s = (access >> 4) & 1
    segment.db = (flags >> 2) & 1
    segment.l = (flags >> 1) & 1
    segment.g = (flags >> 3) & 1
    segment.avl = 0
    segment.unusable = 0
    return segment


def _set_common_sregs(sregs: abi.kvm_sregs) -> None:
    sregs.gdt.base = layout.BOOT_GDT_START
    sregs.gdt.limit = 5 * 8 - 1
    sregs.idt.base = layout.BOOT_IDT_START
    sregs.idt.limit = 0
    data = _segment(SELECTOR_DATA, *_GDT_ENTRIES[SELECTOR_DATA >> 3])
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, data)
    sregs.tr = _segment(SELECTOR_TSS, 0x0, 0x8B, limit=0x67)
    sregs.tr.s = 0
    ldt = abi.kvm_segment()
    ldt.type = 2
    ldt.present = 1
    ldt.limit = 0xFFFF
    sregs.ldt = ldt


def protected_mode_sregs(sregs: abi.kvm_sregs) -> abi.kvm_sregs:
    """PVH entry state: 32-bit protected mode, no paging."""
    _set_common_sregs(sregs)
    sregs.cs = _segment(SELECTOR_CODE32, *_GDT_ENTRIES[SELECTOR_CODE32 >> 3])
    sregs.cr0 = CR0_PE | CR0_ET
    sregs.cr3 = 0
    sregs.cr4 = 0
    sregs.efer = 0
    return sregs


def long_mode_sregs(sregs: abi.kvm_sregs, cr3: int) -> abi.kvm_sregs:
    """64-bit entry state: long mode with identity paging rooted at ``cr3``."""
    _set_common_sregs(sregs)
    sregs.cs = _segment(SELECTOR_CODE64, *_GDT_ENTRIES[SELECTOR_CODE64 >> 3])
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
    sregs.cr3 = cr3
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    return sregs


def boot_regs(entry: int, *, rbx: int = 0, rsi: int = 0) -> abi.kvm_regs:
    regs = abi.kvm_regs()
    regs.rip = entry
    regs.rflags = 0x2
    regs.rbx = rbx
    regs.rsi = rsi
    regs.rsp = layout.BOOT_STACK_POINTER
    regs.rbp = layout.BOOT_STACK_POINTER
    return regs


def boot_fpu() -> abi.kvm_fpu:
    """x87 and SSE state after reset: FCW 0x37f, MXCSR 0x1f80."""
    fpu = abi.kvm_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    return fpu


__all__ = [
    "boot_fpu",
    "boot_regs",
    "gdt_entry",
    "long_mode_sregs",
    "protected_mode_sregs",
    "write_gdt",
    "write_identity_page_tables",
]
