"""The kernel loaders: ELF with a PVH note, bzImage, with an initrd and a command line.

An input is::

    initrd length  u16   in units of 64 bytes (0: no initrd)
    cmdline        u8 length, then that many bytes (decoded as Python decodes argv: UTF-8 with
                   surrogate escapes, so any bytes a user can type reach the loader)
    rsdp           u32
    the rest       the kernel file

The kernel file is the user's (or whoever wrote it), so the promise is a one-line
:class:`~kvmpy.errors.ConfigError` for anything malformed, and nothing written
outside guest RAM whatever the headers say.
"""

from __future__ import annotations

import struct
import tempfile
from pathlib import Path

from kvmpy.abi import bootparam as bp
from kvmpy.abi import pvh
from kvmpy.arch.x86 import layout
from kvmpy.errors import ConfigError
from kvmpy.fuzz.guarded_memory import GuardedMemory
from kvmpy.fuzz.harness import KnownIssue, Reader, Writer, check
from kvmpy.loader import bzimage, elf
from kvmpy.loader.boot_setup import BootSetup

RAM = [(0, 8 << 20)]
PAGE = 4096


def _pvh_note(entry: int, size: int = 8) -> bytes:
    descriptor = struct.pack("<Q" if size == 8 else "<I", entry)
    return struct.pack("<III", 4, size, pvh.XEN_ELFNOTE_PHYS32_ENTRY) + b"Xen\0" + descriptor


def elf_file(elf_class: int, load_at: int = 0x100000, code: bytes = b"\x90" * 32, bss: int = 0x100,
             entry_size: int = 8) -> bytes:  # fmt: skip
    """An ELF32 or ELF64 with one PT_LOAD (code plus bss) and a PT_NOTE holding the PVH entry."""
    note = _pvh_note(load_at, entry_size)
    if elf_class == 2:
        header_size, ph_size, ph_format = 64, 56, "<IIQQQQQQ"
    else:
        header_size, ph_size, ph_format = 52, 32, "<IIIIIIII"
    data_at = header_size + 2 * ph_size
    ident = b"\x7fELF" + bytes([elf_class, 1, 1]) + bytes(9)
    if elf_class == 2:
        header = ident + struct.pack("<HHIQQQIHHHHHH", 2, 0x3E, 1, load_at, header_size, 0, 0, header_size,
                                     ph_size, 2, 64, 0, 0)  # fmt: skip
        load = struct.pack(ph_format, 1, 7, data_at, load_at, load_at, len(code), len(code) + bss, 0x1000)
        notes = struct.pack(ph_format, 4, 4, data_at + len(code), 0, 0, len(note), len(note), 4)
    else:
        header = ident + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, load_at, header_size, 0, 0, header_size,
                                     ph_size, 2, 40, 0, 0)  # fmt: skip
        load = struct.pack(ph_format, 1, data_at, load_at, load_at, len(code), len(code) + bss, 7, 0x1000)
        notes = struct.pack(ph_format, 4, data_at + len(code), 0, 0, len(note), len(note), 4, 4)
    return header + load + notes + code + note


def bzimage_file(version: int = 0x020F, payload: int = 0x800, init_size: int = 0x200000,
                 preferred: int = 0x200000, cmdline_size: int = 2047) -> bytes:  # fmt: skip
    """A bzImage whose setup header has what the 64-bit boot protocol reads."""
    setup_sects = 4
    data = bytearray((setup_sects + 1) * 512 + payload)
    data[bp.SETUP_SECTS] = setup_sects
    struct.pack_into("<H", data, bp.BOOT_FLAG, 0xAA55)
    data[bp.HEADER_END_OFFSET] = 0x6A
    data[bp.HEADER_MAGIC : bp.HEADER_MAGIC + 4] = bp.HDRS_MAGIC
    struct.pack_into("<H", data, bp.VERSION, version)
    struct.pack_into("<I", data, bp.INITRD_ADDR_MAX, 0x7FFF_FFFF)
    struct.pack_into("<I", data, bp.KERNEL_ALIGNMENT, 0x200000)
    data[bp.RELOCATABLE_KERNEL] = 1
    struct.pack_into("<H", data, bp.XLOADFLAGS, bp.XLF_KERNEL_64)
    struct.pack_into("<I", data, bp.CMDLINE_SIZE, cmdline_size)
    struct.pack_into("<Q", data, bp.PREF_ADDRESS, preferred)
    struct.pack_into("<I", data, bp.INIT_SIZE, init_size)
    data[(setup_sects + 1) * 512 :] = b"K" * payload
    return bytes(data)


def encode(kernel: bytes, initrd_units: int = 0, cmdline: bytes = b"", rsdp: int = 0xE0000) -> bytes:
    return Writer().u16(initrd_units).u8(len(cmdline)).raw(cmdline).u32(rsdp).raw(kernel).bytes()


class LoaderTarget:
    """Shared by both formats: the input's decoding, the initrd file, the common checks."""

    name = ""
    max_len = 16384
    invariants: tuple[str, ...] = (
        "only ConfigError escapes, whatever the file says",
        "the guard pages around RAM are untouched",
        "on success: the entry point is RAM, the command line is in RAM byte for byte as given "
        "and NUL-terminated, and the initrd is in RAM byte for byte, page aligned, above the kernel "
        "and below the limit the format sets",
    )
    known: tuple[KnownIssue, ...] = ()

    def __init__(self) -> None:
        self.mem = GuardedMemory(RAM)
        # Under TMPDIR, which the runner gives each engine and removes after it.
        self.directory = Path(tempfile.mkdtemp(prefix="kvmpy-fuzz-loader-"))
        self.kernel = self.directory / "kernel"
        self.initrd = self.directory / "initrd"

    def load(self, data: bytes, initrd: Path | None, cmdline: str, rsdp: int) -> BootSetup:
        raise NotImplementedError

    def initrd_placement(self, boot: BootSetup) -> tuple[int, int, int]:
        """(address, size, highest allowed end) the format recorded for the initrd."""
        raise NotImplementedError

    def check_boot(self, boot: BootSetup, cmdline: bytes) -> None:
        """The format's own checks on success."""

    def run(self, data: bytes) -> None:
        reader = Reader(data)
        initrd_units = reader.u16() % 1024
        cmdline = reader.take(reader.u8())
        rsdp = reader.u32()
        kernel = reader.rest()
        initrd_data = bytes(range(251)) * (initrd_units * 64 // 251 + 1)
        initrd_data = initrd_data[: initrd_units * 64]
        initrd = None
        if initrd_units:
            self.initrd.write_bytes(initrd_data)
            initrd = self.initrd
        text = cmdline.decode("utf-8", errors="surrogateescape")
        try:
            boot = self.load(kernel, initrd, text, rsdp)
        except ConfigError:
            self.mem.check_canaries()
            return
        self.mem.check_canaries()
        check(self.mem.is_ram(boot.entry), f"entry {boot.entry:#x} is not RAM")
        encoded = cmdline + b"\0"
        check(
            self.mem.read(layout.CMDLINE_START, len(encoded)) == encoded, "the command line is not as given"
        )
        if initrd is not None:
            address, size, highest = self.initrd_placement(boot)
            check(size == len(initrd_data), f"initrd size {size}, not {len(initrd_data)}")
            check(
                address % PAGE == 0 and address >= boot.kernel_end,
                f"initrd at {address:#x} overlaps the kernel",
            )
            check(address + size <= highest, f"initrd ends at {address + size:#x}, past {highest:#x}")
            check(self.mem.read(address, size) == initrd_data, "the initrd in RAM differs from the file")
        self.check_boot(boot, encoded)


class ElfTarget(LoaderTarget):
    name = "loader-elf"
    invariants = (
        *LoaderTarget.invariants,
        "the PVH start info has its magic, points at the command line and holds at most "
        "PVH_MEMMAP_MAX_ENTRIES memory map entries",
    )

    def load(self, data: bytes, initrd: Path | None, cmdline: str, rsdp: int) -> BootSetup:
        return elf.load_elf(self.mem, self.kernel, data, initrd=initrd, cmdline=cmdline, rsdp_address=rsdp)

    def initrd_placement(self, boot: BootSetup) -> tuple[int, int, int]:
        entry = self.mem.read_struct(layout.PVH_MODLIST_START, pvh.hvm_modlist_entry)
        return entry.paddr, entry.size, elf.INITRD_MAX_ADDRESS

    def check_boot(self, boot: BootSetup, cmdline: bytes) -> None:
        info = self.mem.read_struct(layout.PVH_START_INFO, pvh.hvm_start_info)
        check(info.magic == pvh.XEN_HVM_START_MAGIC_VALUE, "PVH start info without its magic")
        check(
            info.cmdline_paddr == layout.CMDLINE_START, "PVH start info points elsewhere for the command line"
        )
        check(info.memmap_entries <= layout.PVH_MEMMAP_MAX_ENTRIES, "too many memory map entries")

    def seeds(self) -> list[bytes]:
        return [
            encode(elf_file(2)),
            encode(elf_file(2, entry_size=4), initrd_units=16, cmdline=b"console=ttyS0 quiet"),
            encode(elf_file(1), initrd_units=3, cmdline=b"init=/bin/sh"),
            encode(elf_file(2, load_at=0x200000, bss=0x10000)),
        ]


class BzImageTarget(LoaderTarget):
    name = "loader-bzimage"
    invariants = (
        *LoaderTarget.invariants,
        "the zero page holds the kernel's setup header, the loader type, the command line pointer "
        "and at most E820_MAX_ENTRIES e820 entries",
    )

    def load(self, data: bytes, initrd: Path | None, cmdline: str, rsdp: int) -> BootSetup:
        return bzimage.load_bzimage(
            self.mem, self.kernel, data, initrd=initrd, cmdline=cmdline, rsdp_address=rsdp
        )

    def initrd_placement(self, boot: BootSetup) -> tuple[int, int, int]:
        zero_page = self.mem.read(layout.ZERO_PAGE_START, bp.ZERO_PAGE_SIZE)
        address, size = struct.unpack_from("<II", zero_page, bp.RAMDISK_IMAGE)
        highest = struct.unpack_from("<I", zero_page, bp.INITRD_ADDR_MAX)[0] + 1
        return address, size, min(highest, layout.MMIO_HOLE_START)

    def check_boot(self, boot: BootSetup, cmdline: bytes) -> None:
        zero_page = self.mem.read(layout.ZERO_PAGE_START, bp.ZERO_PAGE_SIZE)
        check(zero_page[bp.TYPE_OF_LOADER] == bp.TYPE_OF_LOADER_UNDEFINED, "the loader type is not set")
        check(struct.unpack_from("<I", zero_page, bp.CMD_LINE_PTR)[0] == layout.CMDLINE_START, "cmd_line_ptr")
        check(zero_page[bp.E820_ENTRIES] <= bp.E820_MAX_ENTRIES, "too many e820 entries")
        limit = struct.unpack_from("<I", zero_page, bp.CMDLINE_SIZE)[0]
        check(
            len(cmdline) - 1 <= limit, f"a command line of {len(cmdline) - 1} bytes passed a limit of {limit}"
        )

    def seeds(self) -> list[bytes]:
        return [
            encode(bzimage_file()),
            encode(bzimage_file(), initrd_units=40, cmdline=b"console=ttyS0 root=/dev/vda"),
            encode(bzimage_file(version=0x020C, cmdline_size=255), cmdline=b"x" * 200),
            encode(bzimage_file(preferred=0x1000000, init_size=0x400000), initrd_units=1),
        ]


FACTORIES = {"loader-elf": ElfTarget, "loader-bzimage": BzImageTarget}

__all__ = ["FACTORIES", "bzimage_file", "elf_file", "encode"]
