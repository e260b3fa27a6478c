"""Guest RAM: the one door through which kvmpy touches guest-physical memory.

Guest RAM is a set of anonymous shared mappings in the VMM's address space,
each registered with KVM as a memory slot. Every guest-physical address
(GPA) the VMM dereferences goes through :class:`GuestMemory`, which checks it
against the regions first: an address the guest supplies that is not RAM
raises :class:`GuestMemoryError`, never touches host memory outside the
mappings, and never crashes the VMM.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from kvmpy.errors import GuestError

_CT = TypeVar("_CT", bound=ctypes.Structure)

PAGE_SIZE = mmap.PAGESIZE
#: Located ranges remembered per region (each device locates its few rings).
MAX_LOCATED = 256
#: madvise hints (not all exported by every Python build).
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
_MADV_REMOVE = getattr(mmap, "MADV_REMOVE", 9)


_ZEROS = bytes(4 << 20)


def is_zeros(view: memoryview) -> bool:
    """True if ``view`` (at most 4 MiB) holds only zero bytes.

    ``bytes(view) == zeros`` copies and then compares with memcmp: about ten
    times faster than comparing the memoryview itself, which CPython does
    element by element.
    """
    return bytes(view) == _ZEROS[: len(view)]


class GuestMemoryError(GuestError):
    """An access to guest-physical memory that is not (entirely) RAM."""

    def __init__(self, gpa: int, size: int, reason: str = "not guest RAM") -> None:
        super().__init__(f"guest memory access at {gpa:#x} (+{size:#x} bytes): {reason}")
        self.gpa = gpa
        self.size = size


@dataclass(eq=False)
class MemoryRegion:
    """One contiguous run of guest RAM backed by one host mapping."""

    gpa: int
    size: int
    mapping: mmap.mmap
    view: memoryview
    #: First guest-physical address past the region (a field: bounds checks sit on every access).
    end: int = field(init=False)
    #: While writes are tracked: one byte per page, non-zero once the VMM handed the page out.
    dirty: bytearray | None = field(default=None, init=False)
    #: Ranges handed out by ``locate`` (offset, size): written at will, so always counted dirty.
    located: set[tuple[int, int]] = field(default_factory=set, init=False)
    #: The memfd behind a shared region (another process maps it: a vhost-user back end), or -1.
    fd: int = -1

    def __post_init__(self) -> None:
        self.end = self.gpa + self.size

    def mark(self, offset: int, size: int) -> None:
        """Pages of ``[offset, offset + size)`` may have been written by the VMM."""
        assert self.dirty is not None
        first, last = offset // PAGE_SIZE, (offset + max(size, 1) - 1) // PAGE_SIZE
        self.dirty[first : last + 1] = b"\1" * (last - first + 1)

    def host_address(self) -> int:
        """Host virtual address of the start of the mapping (for KVM slots)."""
        return ctypes.addressof(ctypes.c_char.from_buffer(self.mapping))


class GuestMemory:
    """Bounds-checked access to guest RAM made of one or more regions."""

    def __init__(self, regions: Sequence[MemoryRegion]) -> None:
        ordered = sorted(regions, key=lambda r: r.gpa)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a.end > b.gpa:
                raise ValueError(f"memory regions overlap at {b.gpa:#x}")
        self._regions = ordered

    @classmethod
    def anonymous(
        cls, ranges: Sequence[tuple[int, int]], *, hugepages: bool = False, shared: bool = False
    ) -> GuestMemory:
        """Map fresh zeroed memory for each ``(gpa, size)`` range.

        Private anonymous memory, as QEMU's and Firecracker's: shared anonymous memory is
        shmem, which takes transparent huge pages only where the host's shmem_enabled
        allows them, so ``hugepages`` (MADV_HUGEPAGE, as QEMU does for guest RAM) would
        be a silent no-op on most hosts. ``shared`` backs each region with a memfd
        instead, sealed against shrinking, so another process (a vhost-user back end)
        can map the same pages: there huge pages follow shmem_enabled.
        """
        regions = []
        for gpa, size in ranges:
            if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE:
                raise ValueError(f"region {gpa:#x}+{size:#x} is not page aligned")
            fd = _sealed_memfd(f"kvmpy-ram-{gpa:#x}", size) if shared else -1
            if shared:
                mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            else:
                mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            if hugepages:
                mapping.madvise(_MADV_HUGEPAGE)
            regions.append(MemoryRegion(gpa, size, mapping, memoryview(mapping), fd=fd))
        return cls(regions)

    @property
    def shared(self) -> bool:
        """Every region is a memfd another process can map."""
        return all(region.fd >= 0 for region in self._regions)

    @classmethod
    def from_file(cls, path: str, ranges: Sequence[tuple[int, int, int]]) -> GuestMemory:
        """Map ``(gpa, size, file offset)`` ranges of a memory file, privately.

        Pages load from the file on first touch and the guest's writes stay in
        this process (copy on write), so restoring a snapshot costs the same
        whatever the guest's size and never changes the snapshot.
        """
        regions: list[MemoryRegion] = []
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for gpa, size, offset in ranges:
                if size <= 0 or size % mmap.PAGESIZE or gpa % mmap.PAGESIZE or offset % mmap.PAGESIZE:
                    raise ValueError(f"region {gpa:#x}+{size:#x} at offset {offset:#x} is not page aligned")
                mapping = mmap.mmap(
                    fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
                )
                regions.append(MemoryRegion(gpa, size, mapping, memoryview(mapping)))
        except BaseException:
            for region in regions:
                region.view.release()
                region.mapping.close()
            raise
        finally:
            os.close(fd)
        return cls(regions)

    def write_to(self, fd: int, chunk: int = 4 << 20) -> int:
        """Every region back to back into ``fd`` (the memory file's layout), as a sparse file:
        chunks of zeros are skipped, not written (most of a fresh guest's RAM). Returns the
        bytes actually written."""
        written, position = 0, 0
        for region in self._regions:
            for start in range(0, region.size, chunk):
                part = region.view[start : start + chunk]
                if is_zeros(part):
                    position += len(part)
                    continue
                os.lseek(fd, position, os.SEEK_SET)
                position += len(part)
                while part:
                    done = os.write(fd, part)
                    part = part[done:]
                    written += done
        os.ftruncate(fd, position)
        return written

    # --- dirty tracking -------------------------------------------------------------
    def track_writes(self) -> None:
        """Record every page the VMM may write from now on (for diff snapshots and migration).

        KVM's dirty log sees only the guest's own writes; disk reads into guest
        buffers, received packets, random bytes and used rings are the VMM's,
        and go through ``slice`` and ``locate``: their pages are recorded here,
        and the two sets are merged.
        """
        for region in self._regions:
            region.dirty = bytearray(region.size // PAGE_SIZE)

    def take_written(self) -> list[bytearray]:
        """Per region, the pages the VMM may have written since the last call (then reset).

        Ranges a device located (its rings) count as written every time: the
        device writes them without asking again.
        """
        taken = []
        for region in self._regions:
            if region.dirty is None:
                raise ValueError("writes are not tracked: call track_writes() first")
            for offset, size in region.located:
                region.mark(offset, size)
            taken.append(region.dirty)
            region.dirty = bytearray(region.size // PAGE_SIZE)
        return taken

    # --- layout ---------------------------------------------------------------------
    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self._regions)

    def __iter__(self) -> Iterator[MemoryRegion]:
        return iter(self._regions)

    def is_ram(self, gpa: int, size: int = 1) -> bool:
        return self._find(gpa, size) is not None

    def _find(self, gpa: int, size: int) -> MemoryRegion | None:
        # Bounds check inline (no method call per region): this runs for every guest access.
        end = gpa + size
        for region in self._regions:
            if region.gpa <= gpa and gpa <= end <= region.end:
                return region
        return None

    # --- raw access -------------------------------------------------------------------
    def slice(self, gpa: int, size: int) -> memoryview:
        """A zero-copy view of ``size`` bytes at ``gpa``; raises if not all RAM.

        The range must lie inside one region (regions are not contiguous in the
        host), which is what device data paths want anyway.
        """
        if size < 0 or gpa < 0:
            raise GuestMemoryError(gpa, size, "negative address or size")
        region = self._find(gpa, size)
        if region is None:
            raise GuestMemoryError(gpa, size)
        start = gpa - region.gpa
        if region.dirty is not None:  # a view may be written: count its pages (reads too)
            region.mark(start, size)
        return region.view[start : start + size]

    def discard(self, gpa: int, size: int) -> None:
        """Give the host back the pages of ``[gpa, gpa + size)`` (a balloon's): their frames
        are freed and the guest reads them as zeros (or, in a restored VM, as the snapshot
        had them) when it touches them again. Whole pages inside one region only."""
        if gpa < 0 or size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE:
            raise GuestMemoryError(gpa, size, "not whole pages")
        region = self._find(gpa, size)
        if region is None:
            raise GuestMemoryError(gpa, size)
        start = gpa - region.gpa
        advice = _MADV_REMOVE if region.fd >= 0 else mmap.MADV_DONTNEED  # shmem keeps pages otherwise
        region.mapping.madvise(advice, start, size)
        if region.dirty is not None:  # what a page holds changed without a write
            region.mark(start, size)

    def gpa_of_view(self, view: memoryview) -> int:
        """The guest-physical address where ``view`` (a slice of guest RAM) starts."""
        host = ctypes.addressof(ctypes.c_char.from_buffer(view))
        for region in self._regions:
            base = region.host_address()
            if base <= host < base + region.size:
                return region.gpa + host - base
        raise GuestMemoryError(host, len(view), "the view is not of guest RAM")

    def locate(self, gpa: int, size: int) -> tuple[memoryview, int]:
        """The view of the whole region holding ``size`` bytes at ``gpa``, and their offset in it.

        For structures a device reads and writes many times (a virtqueue's rings): the
        caller checks the range once and then accesses the region view at the offset
        with struct, with no lookup per access. Unlike a slice, the region view adds
        no export of the mapping, so holding it does not keep the RAM from closing.
        """
        if size < 0 or gpa < 0:
            raise GuestMemoryError(gpa, size, "negative address or size")
        region = self._find(gpa, size)
        if region is None:
            raise GuestMemoryError(gpa, size)
        if len(region.located) < MAX_LOCATED:
            region.located.add((gpa - region.gpa, size))
        else:  # more rings than any device has: track the whole region instead of each one
            region.located = {(0, region.size)}
        return region.view, gpa - region.gpa

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.slice(gpa, size))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        self.slice(gpa, len(view))[:] = view

    def fill(self, gpa: int, size: int, byte: int = 0) -> None:
        self.slice(gpa, size)[:] = bytes([byte]) * size

    # --- scalars --------------------------------------------------------------------
    def read_u8(self, gpa: int) -> int:
        return self.slice(gpa, 1)[0]

    def read_u16(self, gpa: int) -> int:
        return int(struct.unpack_from("<H", self.slice(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(struct.unpack_from("<I", self.slice(gpa, 4))[0])

    def read_u64(self, gpa: int) -> int:
        return int(struct.unpack_from("<Q", self.slice(gpa, 8))[0])

    def write_u8(self, gpa: int, value: int) -> None:
        struct.pack_into("<B", self.slice(gpa, 1), 0, value)

    def write_u16(self, gpa: int, value: int) -> None:
        struct.pack_into("<H", self.slice(gpa, 2), 0, value)

    def write_u32(self, gpa: int, value: int) -> None:
        struct.pack_into("<I", self.slice(gpa, 4), 0, value)

    def write_u64(self, gpa: int, value: int) -> None:
        struct.pack_into("<Q", self.slice(gpa, 8), 0, value)

    # --- typed structs ----------------------------------------------------------------
    def read_struct(self, gpa: int, ctype: type[_CT]) -> _CT:
        """A copy of the ctypes structure stored at ``gpa``."""
        return ctype.from_buffer_copy(self.slice(gpa, ctypes.sizeof(ctype)))

    def write_struct(self, gpa: int, value: ctypes.Structure) -> None:
        self.write(gpa, bytes(value))

    def close(self) -> None:
        for region in self._regions:
            region.view.release()
            region.mapping.close()
            if region.fd >= 0:
                os.close(region.fd)
                region.fd = -1


def _sealed_memfd(name: str, size: int) -> int:
    """A memfd of ``size`` bytes that can no longer shrink or grow (a back end that maps it
    never faults on a page that went away)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
    except BaseException:
        os.close(fd)
        raise
    return fd


__all__ = ["GuestMemory", "GuestMemoryError", "MemoryRegion", "is_zeros"]
