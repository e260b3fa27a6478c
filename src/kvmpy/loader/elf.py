"""ELF kernels with a PVH entry note: the test guests and Linux's vmlinux.

The file is untrusted input: every header field is checked against the
file's size and against guest RAM before use, and anything malformed is a
one-line :class:`ConfigError`, never an IndexError or a write outside RAM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from kvmpy.abi import pvh
from kvmpy.arch.x86 import layout
from kvmpy.arch.x86.e820 import build_e820
from kvmpy.errors import ConfigError
from kvmpy.loader.boot_setup import BootMode, BootSetup
from kvmpy.loader.cmdline import write_cmdline
from kvmpy.loader.initrd import load_initrd
from kvmpy.memory.guest_memory import GuestMemory, GuestMemoryError

ELF_MAGIC = b"\x7fELF"
PT_LOAD = 1
PT_NOTE = 4
MAX_PROGRAM_HEADERS = 256
INITRD_MAX_ADDRESS = layout.MMIO_HOLE_START


@dataclass(frozen=True, slots=True)
class Segment:
    type: int
    offset: int
    paddr: int
    filesz: int
    memsz: int


def is_elf(header: bytes) -> bool:
    return header[:4] == ELF_MAGIC


def parse_segments(data: bytes, name: str) -> list[Segment]:
    """The program headers of an ELF32 or ELF64 little-endian file."""
    if len(data) < 52 or not is_elf(data):
        raise ConfigError(f"kernel {name} is not an ELF file")
    elf_class, encoding = data[4], data[5]
    if encoding != 1:
        raise ConfigError(f"kernel {name} is a big-endian ELF; x86 needs little-endian")
    if elf_class == 2:
        if len(data) < 64:
            raise ConfigError(f"kernel {name} is truncated (ELF header)")
        (phoff,) = struct.unpack_from("<Q", data, 32)
        phentsize, phnum = struct.unpack_from("<HH", data, 54)
        layout_fmt, min_entry = "<IIQQQQQQ", 56
    elif elf_class == 1:
        (phoff,) = struct.unpack_from("<I", data, 28)
        phentsize, phnum = struct.unpack_from("<HH", data, 42)
        layout_fmt, min_entry = "<IIIIIIII", 32
    else:
        raise ConfigError(f"kernel {name} has an unknown ELF class {elf_class}")
    if phnum > MAX_PROGRAM_HEADERS or phentsize < min_entry:
        raise ConfigError(f"kernel {name} has a malformed program header table")
    segments = []
    for i in range(phnum):
        start = phoff + i * phentsize
        if start + min_entry > len(data):
            raise ConfigError(f"kernel {name} is truncated (program header {i})")
        fields = struct.unpack_from(layout_fmt, data, start)
        if elf_class == 2:
            p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz, _ = fields
        else:
            p_type, p_offset, _, p_paddr, p_filesz, p_memsz, _, _ = fields
        segments.append(Segment(p_type, p_offset, p_paddr, p_filesz, p_memsz))
    return segments


def find_pvh_entry(data: bytes, segments: list[Segment]) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address from the PT_NOTE segments, if any."""
    for segment in segments:
        if segment.type != PT_NOTE:
            continue
        notes = data[segment.offset : segment.offset + segment.filesz]
        position = 0
        while position + 12 <= len(notes):
            namesz, descsz, note_type = struct.unpack_from("<III", notes, position)
            name_start = position + 12
            desc_start = name_start + ((namesz + 3) & ~3)
            position = desc_start + ((descsz + 3) & ~3)
            if position > len(notes) or position <= name_start - 12:
                break
            name = notes[name_start : name_start + namesz].rstrip(b"\0")
            if name == b"Xen" and note_type == pvh.XEN_ELFNOTE_PHYS32_ENTRY and descsz in (4, 8):
                fmt = "<I" if descsz == 4 else "<Q"
                return int(struct.unpack_from(fmt, notes, desc_start)[0]) & 0xFFFF_FFFF
    return None


def load_elf(
    mem: GuestMemory,
    path: Path,
    data: bytes,
    *,
    initrd: Path | None,
    cmdline: str,
    rsdp_address: int,
) -> BootSetup:
    name = str(path)
    segments = parse_segments(data, name)
    entry = find_pvh_entry(data, segments)
    if entry is None:
        raise ConfigError(
            f"kernel {name} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY): "
            "build it with one, or boot a bzImage"
        )
    kernel_end = _load_segments(mem, data, segments, name)
    if not mem.is_ram(entry):
        raise ConfigError(f"kernel {name}: PVH entry {entry:#x} is outside guest RAM")
    _write_start_info(mem, path, initrd, cmdline, rsdp_address, kernel_end)
    return BootSetup(
        entry=entry,
        mode=BootMode.PVH,
        boot_info=layout.PVH_START_INFO,
        kernel_end=kernel_end,
        description=f"ELF with PVH entry {entry:#x}",
    )


def _load_segments(mem: GuestMemory, data: bytes, segments: list[Segment], name: str) -> int:
    kernel_end = 0
    loads = [s for s in segments if s.type == PT_LOAD and s.memsz]
    if not loads:
        raise ConfigError(f"kernel {name} has no loadable segments")
    for segment in loads:
        if segment.filesz > segment.memsz or segment.offset + segment.filesz > len(data):
            raise ConfigError(f"kernel {name} has a segment larger than the file")
        if segment.paddr < layout.HIGH_MEMORY_START:
            raise ConfigError(
                f"kernel {name} wants to load at {segment.paddr:#x}, below 1 MiB where the boot data lives"
            )
        try:
            target = mem.slice(segment.paddr, segment.memsz)
        except GuestMemoryError:
            raise ConfigError(
                f"kernel {name} segment at {segment.paddr:#x} (+{segment.memsz:#x}) does not fit in "
                "guest RAM: give the VM more --memory"
            ) from None
        target[: segment.filesz] = data[segment.offset : segment.offset + segment.filesz]
        target[segment.filesz :] = bytes(segment.memsz - segment.filesz)
        kernel_end = max(kernel_end, segment.paddr + segment.memsz)
    return kernel_end


def _write_start_info(
    mem: GuestMemory,
    path: Path,
    initrd: Path | None,
    cmdline: str,
    rsdp_address: int,
    kernel_end: int,
) -> None:
    start_info = pvh.hvm_start_info(
        magic=pvh.XEN_HVM_START_MAGIC_VALUE,
        version=1,
        cmdline_paddr=write_cmdline(mem, cmdline),
        rsdp_paddr=rsdp_address,
    )
    if initrd is not None:
        address, size = load_initrd(mem, initrd, lowest=kernel_end, highest=INITRD_MAX_ADDRESS)
        mem.write_struct(layout.PVH_MODLIST_START, pvh.hvm_modlist_entry(paddr=address, size=size))
        start_info.nr_modules = 1
        start_info.modlist_paddr = layout.PVH_MODLIST_START
    memmap = build_e820(mem)[: layout.PVH_MEMMAP_MAX_ENTRIES]
    for i, entry in enumerate(memmap):
        mem.write_struct(
            layout.PVH_MEMMAP_START + i * 24,
            pvh.hvm_memmap_table_entry(addr=entry.address, size=entry.size, type=entry.type),
        )
    start_info.memmap_paddr = layout.PVH_MEMMAP_START
    start_info.memmap_entries = len(memmap)
    mem.write_struct(layout.PVH_START_INFO, start_info)


__all__ = ["find_pvh_entry", "is_elf", "load_elf", "parse_segments"]
