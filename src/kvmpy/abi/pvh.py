"""The PVH boot ABI structures (Xen's include/public/arch-x86/hvm/start_info.h).

A PVH kernel starts in 32-bit protected mode with EBX pointing at
``hvm_start_info``, which locates the command line, the modules (initrd)
and the memory map.
"""

from __future__ import annotations

import ctypes

XEN_HVM_START_MAGIC_VALUE = 0x336EC578
#: ELF note type carrying the 32-bit physical entry point, in a "Xen" note.
XEN_ELFNOTE_PHYS32_ENTRY = 18

# Memory map entry types (same values as e820).
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3


class hvm_start_info(ctypes.Structure):  # noqa: N801 (C name)
    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("nr_modules", ctypes.c_uint32),
        ("modlist_paddr", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("rsdp_paddr", ctypes.c_uint64),
        ("memmap_paddr", ctypes.c_uint64),
        ("memmap_entries", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class hvm_modlist_entry(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("paddr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64),
        ("reserved", ctypes.c_uint64),
    ]


class hvm_memmap_table_entry(ctypes.Structure):  # noqa: N801
    _fields_ = [
        ("addr", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
        ("type", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


assert ctypes.sizeof(hvm_start_info) == 56
assert ctypes.sizeof(hvm_modlist_entry) == 32
assert ctypes.sizeof(hvm_memmap_table_entry) == 24
