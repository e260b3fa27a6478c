"""Kernel loaders: PVH ELF, bzImage, flat binaries; hostile files give clear errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.abi import bootparam as bp
from kvmpy.abi import pvh
from kvmpy.arch.x86 import layout
from kvmpy.arch.x86.e820 import E820_RAM, E820_RESERVED, build_e820
from kvmpy.errors import ConfigError
from kvmpy.loader import BootMode, load_kernel
from kvmpy.memory.guest_memory import GuestMemory

MiB = 1 << 20


def elf64(
    entry_note: int | None, load_at: int = 0x100000, code: bytes = b"\x90" * 16, bss: int = 64
) -> bytes:
    """A minimal ELF64 with one PT_LOAD and, optionally, a PVH note."""
    note = b""
    if entry_note is not None:
        note = (
            struct.pack("<III", 4, 8, pvh.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + struct.pack("<Q", entry_note)
        )
    phnum = 2 if note else 1
    header_size, ph_size = 64, 56
    data_offset = header_size + ph_size * phnum
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack(
        "<HHIQQQIHHHHHH", 2, 0x3E, 1, load_at, header_size, 0, 0, 64, ph_size, phnum, 64, 0, 0
    )
    phdrs = struct.pack("<IIQQQQQQ", 1, 7, data_offset, load_at, load_at, len(code), len(code) + bss, 0x1000)
    if note:
        note_offset = data_offset + len(code)
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, note_offset, 0, 0, len(note), len(note), 4)
    return header + phdrs + code + note


@pytest.fixture
def mem() -> GuestMemory:
    memory = GuestMemory.anonymous(layout.ram_ranges(64 * MiB))
    yield memory
    memory.close()


def test_pvh_elf(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf64(0x100004))
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"initrd-bytes" * 100)
    boot = load_kernel(mem, kernel, initrd=initrd, cmdline="console=ttyS0 x=1", rsdp_address=0xEFF00)
    assert boot.mode is BootMode.PVH and boot.entry == 0x100004
    info = mem.read_struct(boot.boot_info, pvh.hvm_start_info)
    assert info.magic == pvh.XEN_HVM_START_MAGIC_VALUE
    assert mem.read(info.cmdline_paddr, 18) == b"console=ttyS0 x=1\0"
    assert info.rsdp_paddr == 0xEFF00
    module = mem.read_struct(info.modlist_paddr, pvh.hvm_modlist_entry)
    assert mem.read(module.paddr, module.size) == initrd.read_bytes()
    assert module.paddr % 4096 == 0 and module.paddr >= boot.kernel_end
    assert mem.read(0x100000, 16) == b"\x90" * 16
    assert mem.read(0x100010, 64) == bytes(64)  # bss zeroed


def test_elf_without_note_is_refused(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf64(None))
    with pytest.raises(ConfigError, match="without a PVH entry note"):
        load_kernel(mem, kernel)


def test_elf_outside_ram(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf64(0x100000, load_at=0x8000_0000))
    with pytest.raises(ConfigError, match="does not fit in guest RAM"):
        load_kernel(mem, kernel)


def test_unknown_format(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"just text\n" * 100)
    with pytest.raises(ConfigError, match="neither an ELF"):
        load_kernel(mem, kernel)


def test_command_line_limit(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(elf64(0x100000))
    with pytest.raises(ConfigError, match="command line"):
        load_kernel(mem, kernel, cmdline="x" * layout.CMDLINE_MAX_SIZE)


def test_flat_binary(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "flat.bin"
    kernel.write_bytes(b"\xf4" * 10)
    boot = load_kernel(mem, kernel, flat_address=0x200000)
    assert boot.mode is BootMode.FLAT64 and boot.entry == 0x200000
    assert mem.read(0x200000, 10) == b"\xf4" * 10


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.integers(0, 0x300))
def test_hostile_elf_headers_only_raise_config_errors(junk: bytes, cut: int) -> None:
    memory = GuestMemory.anonymous([(0, 4 * MiB)])
    base = bytearray(elf64(0x100000))
    base[16 : 16 + len(junk)] = junk[: max(0, len(base) - 16)]
    path = Path("/tmp/kvmpy-hostile.elf")
    path.write_bytes(bytes(base[: len(base) - cut] if cut < len(base) else base[:8]))
    try:
        load_kernel(memory, path)
    except ConfigError:
        pass
    finally:
        memory.close()


def bzimage(version: int = 0x020F, xloadflags: int = bp.XLF_KERNEL_64, payload: int = 0x3000) -> bytes:
    setup_sects = 4
    data = bytearray((setup_sects + 1) * 512 + payload)
    data[bp.SETUP_SECTS] = setup_sects
    struct.pack_into("<H", data, bp.BOOT_FLAG, 0xAA55)
    data[bp.HEADER_END_OFFSET] = 0x6A  # header runs to 0x26C
    data[bp.HEADER_MAGIC : bp.HEADER_MAGIC + 4] = bp.HDRS_MAGIC
    struct.pack_into("<H", data, bp.VERSION, version)
    struct.pack_into("<I", data, bp.INITRD_ADDR_MAX, 0x7FFFFFFF)
    struct.pack_into("<I", data, bp.KERNEL_ALIGNMENT, 0x200000)
    data[bp.RELOCATABLE_KERNEL] = 1
    struct.pack_into("<H", data, bp.XLOADFLAGS, xloadflags)
    struct.pack_into("<I", data, bp.CMDLINE_SIZE, 255)
    struct.pack_into("<Q", data, bp.PREF_ADDRESS, 0x1000000)
    struct.pack_into("<I", data, bp.INIT_SIZE, 0x400000)
    data[(setup_sects + 1) * 512 :] = b"K" * payload
    return bytes(data)


def test_bzimage_zero_page(mem: GuestMemory, tmp_path: Path) -> None:
    kernel, initrd = tmp_path / "bzImage", tmp_path / "initrd"
    kernel.write_bytes(bzimage())
    initrd.write_bytes(b"R" * 5000)
    boot = load_kernel(mem, kernel, initrd=initrd, cmdline="console=ttyS0", rsdp_address=0xEFF00)
    assert boot.mode is BootMode.LINUX64 and boot.entry == 0x1000000 + 0x200
    zero = mem.read(boot.boot_info, bp.ZERO_PAGE_SIZE)
    assert zero[bp.HEADER_MAGIC : bp.HEADER_MAGIC + 4] == b"HdrS"
    assert zero[bp.TYPE_OF_LOADER] == 0xFF
    assert zero[bp.LOADFLAGS] & bp.CAN_USE_HEAP
    cmdline_ptr = struct.unpack_from("<I", zero, bp.CMD_LINE_PTR)[0]
    assert mem.read(cmdline_ptr, 14) == b"console=ttyS0\0"
    image, size = struct.unpack_from("<II", zero, bp.RAMDISK_IMAGE)
    assert size == 5000 and mem.read(image, size) == b"R" * 5000
    assert image >= 0x1000000 + 0x400000
    assert struct.unpack_from("<Q", zero, bp.ACPI_RSDP_ADDR)[0] == 0xEFF00
    assert zero[bp.E820_ENTRIES] >= 2
    assert mem.read(0x1000000, 4) == b"KKKK"


def test_bzimage_errors(mem: GuestMemory, tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(bzimage(version=0x0206))
    with pytest.raises(ConfigError, match=r"boot protocol 2\.06"):
        load_kernel(mem, kernel)
    kernel.write_bytes(bzimage(xloadflags=0))
    with pytest.raises(ConfigError, match="64-bit entry"):
        load_kernel(mem, kernel)
    kernel.write_bytes(bzimage())
    with pytest.raises(ConfigError, match="command line is 300 bytes, over the limit of 255"):
        load_kernel(mem, kernel, cmdline="x" * 300)
    big = tmp_path / "big-initrd"
    big.write_bytes(bytes(80 * MiB))
    with pytest.raises(ConfigError, match="does not fit"):
        load_kernel(mem, kernel, initrd=big)


def test_e820_reserves_the_legacy_hole() -> None:
    memory = GuestMemory.anonymous(layout.ram_ranges(4 << 30))
    entries = build_e820(memory)
    ram = [(e.address, e.size) for e in entries if e.type == E820_RAM]
    assert ram[0] == (0, layout.EBDA_START)
    assert (layout.HIGH_MEMORY_START, layout.MMIO_HOLE_START - layout.HIGH_MEMORY_START) in ram
    assert (layout.HIGH_RAM_START, (4 << 30) - layout.MMIO_HOLE_START) in ram
    assert any(e.type == E820_RESERVED and e.address == layout.EBDA_START for e in entries)
    memory.close()


REAL_KERNELS = sorted(Path.home().glob(".cache/kvmpy/**/vmlinuz-*"))


@pytest.mark.skipif(not REAL_KERNELS, reason="no Debian kernel in the kvmpy cache (kvmpy image build)")
def test_real_debian_bzimage(tmp_path: Path) -> None:
    memory = GuestMemory.anonymous(layout.ram_ranges(512 * MiB))
    boot = load_kernel(memory, REAL_KERNELS[0], cmdline="console=ttyS0")
    assert boot.mode is BootMode.LINUX64
    assert "boot protocol 2." in boot.description
    memory.close()
