"""The host side of a virtio-blk disk: a raw image file, through the page cache or with O_DIRECT.

Buffered mode reads and writes guest memory straight from and to the file
(``preadv``/``pwritev`` on memoryviews of guest RAM). Direct mode opens the
file with ``O_DIRECT``: no host page cache, so a guest's I/O costs what its
disk costs and the host's memory is not spent twice. O_DIRECT needs offsets,
lengths and buffer addresses aligned to the file system's block size; the
device advertises that size to the driver, and the rare request that is
still misaligned (a hostile or old driver) goes through an aligned bounce
buffer instead of failing.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

from kvmpy.errors import ConfigError

#: Block sizes tried for O_DIRECT, smallest first.
DIRECT_ALIGNMENTS = (512, 4096)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class DiskFile:
    """A raw image opened for a virtio-blk device."""

    def __init__(self, path: Path, *, read_only: bool = False, direct: bool = False) -> None:
        flags = os.O_RDONLY if read_only else os.O_RDWR
        if direct:
            flags |= os.O_DIRECT
        try:
            self._fd = os.open(path, flags)
        except OSError as error:
            reason = error.strerror
            if direct and error.errno == errno.EINVAL:
                reason = "its file system does not support O_DIRECT (direct=on)"
            raise ConfigError(f"disk {path} cannot be opened: {reason}") from None
        self.size = os.fstat(self._fd).st_size
        self.direct = direct
        #: The I/O granularity the file needs: the logical block size the device advertises.
        self.alignment = _probe_alignment(self._fd, path) if direct else 512
        #: Requests that went through the bounce buffer because guest memory was misaligned.
        self.bounced = 0

    def close(self) -> None:
        os.close(self._fd)

    def read(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill ``buffers`` from ``offset``; returns the bytes read."""
        if self.direct and not self._aligned(offset, buffers):
            return self._bounced_read(offset, buffers)
        return os.preadv(self._fd, buffers, offset)

    def write(self, offset: int, buffers: list[memoryview]) -> None:
        """Write ``buffers`` at ``offset``."""
        if self.direct and not self._aligned(offset, buffers):
            self._bounced_write(offset, buffers)
        else:
            os.pwritev(self._fd, buffers, offset)

    def flush(self) -> None:
        os.fsync(self._fd)

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a range (reads as zeroes afterwards); falls back to writing zeroes."""
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _libc().fallocate(self._fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) == 0:
            return
        self.write(offset, [memoryview(bytearray(length))])

    def _aligned(self, offset: int, buffers: list[memoryview]) -> bool:
        mask = self.alignment - 1
        if offset & mask:
            return False
        return all(not (len(b) & mask or (len(b) and _address(b) & mask)) for b in buffers)

    def _bounce(self, offset: int, length: int) -> tuple[mmap.mmap, int]:
        """An aligned buffer covering ``length`` bytes at ``offset``, filled from the file."""
        start = offset - offset % self.alignment
        end = -(-(offset + length) // self.alignment) * self.alignment
        bounce = mmap.mmap(-1, max(end - start, mmap.PAGESIZE))
        os.preadv(self._fd, [memoryview(bounce)[: end - start]], start)
        self.bounced += 1
        return bounce, offset - start

    def _bounced_read(self, offset: int, buffers: list[memoryview]) -> int:
        length = sum(len(b) for b in buffers)
        bounce, skip = self._bounce(offset, length)
        with bounce:
            data = memoryview(bounce)
            for buffer in buffers:
                buffer[:] = data[skip : skip + len(buffer)]
                skip += len(buffer)
            data.release()
        return length

    def _bounced_write(self, offset: int, buffers: list[memoryview]) -> None:
        """Read-modify-write of the aligned span around the request."""
        length = sum(len(b) for b in buffers)
        bounce, skip = self._bounce(offset, length)
        with bounce:
            data = memoryview(bounce)
            start = skip
            for buffer in buffers:
                data[skip : skip + len(buffer)] = buffer
                skip += len(buffer)
            span = -(-skip // self.alignment) * self.alignment
            os.pwrite(self._fd, data[:span], offset - start)
            data.release()


def _address(buffer: memoryview) -> int:
    """The host address of a (writable) memoryview of guest RAM."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def _probe_alignment(fd: int, path: Path) -> int:
    """The smallest block size O_DIRECT reads on this file accept."""
    with mmap.mmap(-1, mmap.PAGESIZE) as page:
        for alignment in DIRECT_ALIGNMENTS:
            try:
                os.preadv(fd, [memoryview(page)[:alignment]], 0)
                return alignment
            except OSError as error:
                if error.errno != errno.EINVAL:
                    raise ConfigError(f"disk {path} cannot be read: {error.strerror}") from None
    raise ConfigError(f"disk {path} cannot be opened: O_DIRECT reads fail at every block size")


_LIBC: ctypes.CDLL | None = None


def _libc() -> ctypes.CDLL:
    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(None, use_errno=True)
    return _LIBC


__all__ = ["DiskFile"]
