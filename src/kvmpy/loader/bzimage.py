"""Linux bzImage kernels through the 64-bit boot protocol (Documentation/arch/x86/boot.rst).

kvmpy plays the boot loader: it copies the setup header into a fresh zero
page, fills in what a loader must (loader type, command line, initrd, e820
map, ACPI RSDP), loads the protected-mode kernel where the header prefers,
and starts the vCPU in long mode at the 64-bit entry (load address + 0x200)
with RSI pointing at the zero page. The 16-bit setup code is never run.
"""

from __future__ import annotations

import struct
from pathlib import Path

from kvmpy.abi import bootparam as bp
from kvmpy.arch.x86 import layout
from kvmpy.arch.x86.e820 import build_e820
from kvmpy.errors import ConfigError
from kvmpy.loader.boot_setup import BootMode, BootSetup
from kvmpy.loader.cmdline import write_cmdline
from kvmpy.loader.initrd import load_initrd
from kvmpy.memory.guest_memory import GuestMemory, GuestMemoryError

#: 2.12 brought xloadflags, which says whether the 64-bit entry exists.
MIN_PROTOCOL = 0x020C
ENTRY_64_OFFSET = 0x200


def is_bzimage(header: bytes) -> bool:
    return len(header) >= 0x206 and header[bp.HEADER_MAGIC : bp.HEADER_MAGIC + 4] == bp.HDRS_MAGIC


def _u8(data: bytes | bytearray, offset: int) -> int:
    return data[offset]


def _u16(data: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from("<H", data, offset)[0])


def _u32(data: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from("<I", data, offset)[0])


def _u64(data: bytes | bytearray, offset: int) -> int:
    return int(struct.unpack_from("<Q", data, offset)[0])


def load_bzimage(
    mem: GuestMemory,
    path: Path,
    data: bytes,
    *,
    initrd: Path | None,
    cmdline: str,
    rsdp_address: int,
) -> BootSetup:
    name = str(path)
    if len(data) < 0x1000:
        raise ConfigError(f"kernel {name} is truncated (smaller than its setup header)")
    version = _u16(data, bp.VERSION)
    if version < MIN_PROTOCOL:
        raise ConfigError(
            f"kernel {name} speaks boot protocol {version >> 8}.{version & 0xFF:02}; kvmpy needs "
            f"{MIN_PROTOCOL >> 8}.{MIN_PROTOCOL & 0xFF} or newer (Linux 3.8+)"
        )
    header_end = 0x202 + _u8(data, bp.HEADER_END_OFFSET)
    if header_end < bp.INIT_SIZE + 4:  # the fields read below must be in the header the kernel gets
        raise ConfigError(
            f"kernel {name} has a setup header ending at {header_end:#x}, before the boot protocol "
            f"2.12 fields it must hold (to {bp.INIT_SIZE + 4:#x})"
        )
    if not _u16(data, bp.XLOADFLAGS) & bp.XLF_KERNEL_64:
        raise ConfigError(f"kernel {name} has no 64-bit entry point (xloadflags lacks XLF_KERNEL_64)")
    setup_sects = _u8(data, bp.SETUP_SECTS) or 4
    kernel_offset = (setup_sects + 1) * 512
    if kernel_offset >= len(data):
        raise ConfigError(f"kernel {name} is truncated (no protected-mode kernel after the setup code)")
    payload = memoryview(data)[kernel_offset:]

    load_address = _load_address(data)
    init_size = max(_u32(data, bp.INIT_SIZE), len(payload))
    try:
        mem.slice(load_address, init_size)
        mem.write(load_address, payload)
    except GuestMemoryError:
        raise ConfigError(
            f"kernel {name} needs {init_size >> 20} MiB at {load_address:#x}: give the VM more --memory"
        ) from None

    zero_page = _zero_page(data)
    cmdline_limit = _u32(data, bp.CMDLINE_SIZE) + 1
    cmdline_address = write_cmdline(mem, cmdline, limit=min(cmdline_limit, layout.CMDLINE_MAX_SIZE))
    struct.pack_into("<I", zero_page, bp.CMD_LINE_PTR, cmdline_address)
    struct.pack_into("<I", zero_page, bp.EXT_CMD_LINE_PTR, 0)
    if initrd is not None:
        highest = min(_u32(data, bp.INITRD_ADDR_MAX) + 1, layout.MMIO_HOLE_START)
        address, size = load_initrd(mem, initrd, lowest=load_address + init_size, highest=highest)
        struct.pack_into("<II", zero_page, bp.RAMDISK_IMAGE, address, size)
    struct.pack_into("<Q", zero_page, bp.ACPI_RSDP_ADDR, rsdp_address)
    _write_e820(zero_page, mem)
    mem.write(layout.ZERO_PAGE_START, zero_page)
    return BootSetup(
        entry=load_address + ENTRY_64_OFFSET,
        mode=BootMode.LINUX64,
        boot_info=layout.ZERO_PAGE_START,
        kernel_end=load_address + init_size,
        description=f"bzImage, boot protocol {version >> 8}.{version & 0xFF:02}, 64-bit entry",
    )


def _load_address(data: bytes) -> int:
    """Where the protected-mode kernel goes: its preferred address, suitably aligned."""
    preferred = _u64(data, bp.PREF_ADDRESS) or layout.HIGH_MEMORY_START
    alignment = _u32(data, bp.KERNEL_ALIGNMENT) or 0x200000
    if alignment & (alignment - 1):
        alignment = 0x200000
    address = max(preferred, layout.HIGH_MEMORY_START)
    return (address + alignment - 1) & ~(alignment - 1)


def _zero_page(data: bytes) -> bytearray:
    """A zero page holding the kernel's own setup header, with the loader's fields set."""
    zero_page = bytearray(bp.ZERO_PAGE_SIZE)
    header_end = min(0x202 + _u8(data, bp.HEADER_END_OFFSET), bp.ZERO_PAGE_SIZE)
    zero_page[bp.SETUP_HEADER_START : header_end] = data[bp.SETUP_HEADER_START : header_end]
    zero_page[bp.TYPE_OF_LOADER] = bp.TYPE_OF_LOADER_UNDEFINED
    zero_page[bp.LOADFLAGS] |= bp.CAN_USE_HEAP | bp.LOADED_HIGH
    struct.pack_into("<H", zero_page, bp.HEAP_END_PTR, 0xFE00)
    return zero_page


def _write_e820(zero_page: bytearray, mem: GuestMemory) -> None:
    entries = build_e820(mem)[: bp.E820_MAX_ENTRIES]
    for i, entry in enumerate(entries):
        struct.pack_into(
            "<QQI", zero_page, bp.E820_TABLE + i * bp.E820_ENTRY_SIZE, entry.address, entry.size, entry.type
        )
    zero_page[bp.E820_ENTRIES] = len(entries)


__all__ = ["is_bzimage", "load_bzimage"]
