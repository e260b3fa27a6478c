"""The host side of a virtio-blk disk: a raw image file, through the page cache or with O_DIRECT.

Buffered mode reads and writes guest memory straight from and to the file
(``preadv``/``pwritev`` on memoryviews of guest RAM). Direct mode opens the
file with ``O_DIRECT``: no host page cache, so a guest's I/O costs what its
disk costs and the host's memory is not spent twice. O_DIRECT needs offsets,
lengths and buffer addresses aligned to the file system's block size; the
device advertises that size to the driver, and the rare request that is
still misaligned (a hostile or old driver) goes through an aligned bounce
buffer of a fixed size, a piece at a time, instead of failing.

Every transfer is carried to its end: the kernel may move fewer bytes than
asked (one call moves at most 2 GiB - 4 KiB), so the rest goes in further
calls, and a call that moves nothing is an error (:class:`OSError`), never
a success.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path

from kvmpy.errors import ConfigError

#: Block sizes tried for O_DIRECT, smallest first.
DIRECT_ALIGNMENTS = (512, 4096)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
#: The bounce buffer for misaligned direct-mode requests: a fixed 1 MiB, whatever the request's
#: size (the guest's descriptors may alias, so a request can be far larger than guest RAM).
BOUNCE_SIZE = 1 << 20
#: Zeroes written per call where the file system cannot punch holes: bounded memory per request.
ZERO_CHUNK = 1 << 20


class DiskFile:
    """A raw image opened for a virtio-blk device (used under the device's lock)."""

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
        self._bounce: mmap.mmap | None = None
        self._zeroes: mmap.mmap | None = None

    def close(self) -> None:
        os.close(self._fd)
        for area in (self._bounce, self._zeroes):
            if area is not None:
                area.close()

    def read(self, offset: int, buffers: list[memoryview]) -> int:
        """Fill ``buffers`` from ``offset``; returns the bytes read (all of them, or OSError)."""
        if self.direct and not self._aligned(offset, buffers):
            return self._bounced(offset, buffers, writing=False)
        return _transfer(os.preadv, self._fd, buffers, offset)

    def write(self, offset: int, buffers: list[memoryview]) -> None:
        """Write all of ``buffers`` at ``offset`` (or raise OSError)."""
        if self.direct and not self._aligned(offset, buffers):
            self._bounced(offset, buffers, writing=True)
        else:
            _transfer(os.pwritev, self._fd, buffers, offset)

    def flush(self) -> None:
        os.fsync(self._fd)

    def punch_hole(self, offset: int, length: int) -> None:
        """Deallocate a range (reads as zeroes afterwards); falls back to writing zeroes."""
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        if _libc().fallocate(self._fd, mode, ctypes.c_long(offset), ctypes.c_long(length)) == 0:
            return
        if self._zeroes is None:  # page-aligned and never written: fit for O_DIRECT too
            self._zeroes = mmap.mmap(-1, ZERO_CHUNK)
        zeroes = memoryview(self._zeroes)
        try:
            for start in range(offset, offset + length, ZERO_CHUNK):
                self.write(start, [zeroes[: min(ZERO_CHUNK, offset + length - start)]])
        finally:
            zeroes.release()

    def _aligned(self, offset: int, buffers: list[memoryview]) -> bool:
        mask = self.alignment - 1
        if offset & mask:
            return False
        return all(not (len(b) & mask or (len(b) and _address(b) & mask)) for b in buffers)

    def _bounced(self, offset: int, buffers: list[memoryview], *, writing: bool) -> int:
        """A misaligned request through the bounce buffer, one aligned span of it at a time.

        Reading copies each span out to the guest's buffers; writing reads back the blocks
        the request covers only in part (its first and last), copies the guest's data in
        and writes the span.
        """
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, BOUNCE_SIZE)
        self.bounced += 1
        length = sum(map(len, buffers))
        end, block = offset + length, self.alignment
        guest = _Cursor(buffers)
        bounce = memoryview(self._bounce)
        try:
            position = offset
            while position < end:
                start = position - position % block
                stop = min(start + BOUNCE_SIZE, -(-end // block) * block)
                span, low, high = bounce[: stop - start], position - start, min(end, stop) - start
                if not writing or low or high < len(span):
                    _transfer(os.preadv, self._fd, [span], start)
                if writing:
                    guest.copy_to(span[low:high])
                    _transfer(os.pwritev, self._fd, [span], start)
                else:
                    guest.copy_from(span[low:high])
                span.release()
                position = start + high
        finally:
            bounce.release()
        return length


class _Cursor:
    """The guest's buffers as one stream, consumed front to back."""

    def __init__(self, buffers: list[memoryview]) -> None:
        self._buffers = [b for b in buffers if len(b)]
        self._index = self._offset = 0

    def _step(self, target: memoryview, to_guest: bool) -> None:
        done = 0
        while done < len(target):
            buffer = self._buffers[self._index]
            count = min(len(buffer) - self._offset, len(target) - done)
            piece = buffer[self._offset : self._offset + count]
            if to_guest:
                piece[:] = target[done : done + count]
            else:
                target[done : done + count] = piece
            done += count
            self._offset += count
            if self._offset == len(buffer):
                self._index, self._offset = self._index + 1, 0

    def copy_from(self, source: memoryview) -> None:
        """The next ``len(source)`` bytes of the guest's buffers get ``source``."""
        self._step(source, to_guest=True)

    def copy_to(self, target: memoryview) -> None:
        """``target`` gets the next ``len(target)`` bytes of the guest's buffers."""
        self._step(target, to_guest=False)


def _transfer(
    call: Callable[[int, list[memoryview], int], int], fd: int, buffers: list[memoryview], offset: int
) -> int:
    """``preadv``/``pwritev`` until every byte moved; a call that moves none is EIO."""
    total = sum(map(len, buffers))
    done = 0
    while done < total:
        moved = call(fd, buffers, offset + done)
        if moved <= 0:
            raise OSError(errno.EIO, f"the image moved {done} of {total} bytes at offset {offset}")
        done += moved
        buffers = _skip(buffers, moved)
    return done


def _skip(buffers: list[memoryview], count: int) -> list[memoryview]:
    """``buffers`` without their first ``count`` bytes."""
    out = []
    for buffer in buffers:
        if count >= len(buffer):
            count -= len(buffer)
            continue
        out.append(buffer[count:])
        count = 0
    return out


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


__all__ = ["BOUNCE_SIZE", "ZERO_CHUNK", "DiskFile"]
