"""virtio-blk (virtio 1.x, 5.2) on a raw image file.

Requests carry a 16-byte header (type, sector), data buffers and a status
byte. Data moves straight between the image file (through the host's page
cache, or with O_DIRECT: see :mod:`disk_file`) and memoryviews of guest RAM:
no copies. Flush is fsync. A request the
driver got wrong (short header, a read-only device written, sectors past
the end) completes with an error status; only a broken ring resets the
device.
"""

from __future__ import annotations

import struct
from pathlib import Path

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.device import COMMON_FEATURES, TYPE_BLOCK, Interrupt
from kvmpy.virtio.devices.disk_file import DiskFile
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import DescriptorChain, SplitQueue

SECTOR = 512
F_SEG_MAX = 1 << 2
F_RO = 1 << 5
F_BLK_SIZE = 1 << 6
F_FLUSH = 1 << 9
F_DISCARD = 1 << 13
F_WRITE_ZEROES = 1 << 14

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
ID_BYTES = 20
SEG_MAX = 126
MAX_DISCARD_SECTORS = 1 << 22


class VirtioBlock:
    device_type = TYPE_BLOCK
    queue_sizes: tuple[int, ...] = (256,)

    def __init__(
        self, path: Path, *, read_only: bool = False, device_id: str = "", direct: bool = False
    ) -> None:
        self.guard = DeviceGuard()
        self._file = DiskFile(path, read_only=read_only, direct=direct)
        block_size = self._file.alignment
        # Whole blocks only: an O_DIRECT write of a partial last block would grow the file.
        self.capacity = self._file.size // block_size * block_size // SECTOR
        self.read_only = read_only
        self.device_id = (device_id or path.name).encode()[:ID_BYTES]
        self.features = COMMON_FEATURES | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | F_DISCARD | F_WRITE_ZEROES
        if read_only:
            self.features |= F_RO
        self._config = struct.pack("<QII4xI", self.capacity, 0, SEG_MAX, block_size)
        self._config = self._config.ljust(36, b"\0")
        # discard and write-zeroes limits (offsets 36-59)
        self._config += struct.pack("<IIIIIB3x", MAX_DISCARD_SECTORS, 1, 1, MAX_DISCARD_SECTORS, 1, 1)
        self._mem: GuestMemory | None = None
        self._queue: SplitQueue | None = None
        self._interrupt: Interrupt | None = None
        self.requests = 0
        self.errors = 0

    @property
    def bounced(self) -> int:
        """Requests copied through an aligned buffer (direct mode, misaligned guest memory)."""
        return self._file.bounced

    def close(self) -> None:
        self._file.close()

    def read_config(self, offset: int, size: int) -> bytes:
        return self._config[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        pass  # writeback toggling is not offered

    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        with self.guard.lock:
            self._mem, self._queue, self._interrupt = mem, queues[0], interrupt

    def reset(self) -> None:
        with self.guard.lock:  # waits for a request in flight: it completes into the old ring
            self._mem = self._queue = self._interrupt = None

    def queue_notify(self, index: int) -> None:
        with self.guard.lock:
            mem, queue, interrupt = self._mem, self._queue, self._interrupt
            if mem is None or queue is None or interrupt is None:
                return
            done = False
            while (chain := queue.pop(mem)) is not None:
                written = self._handle(chain)
                queue.push(mem, chain.head, written)
                done = True
            if done and queue.needs_interrupt(mem):
                interrupt(0)

    def _handle(self, chain: DescriptorChain) -> int:
        """Serve one request; returns the bytes written into the chain (data + status)."""
        self.requests += 1
        if not chain.writable or len(chain.writable[-1]) < 1:
            self.errors += 1
            return 0  # nowhere to put a status: the request is dropped
        status_buffer = chain.writable[-1]
        data_out = chain.writable[:-1]
        if len(status_buffer) > 1:  # the status shares its buffer with data
            data_out = [*data_out, status_buffer[:-1]]
            status_buffer = status_buffer[-1:]
        header = _head(chain.readable, 16)
        if len(header) < 16:
            status_buffer[0] = S_IOERR
            self.errors += 1
            return 1
        request_type, _, sector = struct.unpack("<IIQ", header)
        payload = _skip(chain.readable, 16)
        status, written = self._dispatch(request_type, sector, payload, data_out)
        if status != S_OK:
            self.errors += 1
        status_buffer[0] = status
        return written + 1

    def _dispatch(
        self, request_type: int, sector: int, payload: list[memoryview], data_out: list[memoryview]
    ) -> tuple[int, int]:
        if request_type == T_IN:
            length = sum(len(b) for b in data_out)
            if not self._in_range(sector, length):
                return S_IOERR, 0
            return S_OK, self._file.read(sector * SECTOR, data_out)
        if request_type == T_OUT:
            length = sum(len(b) for b in payload)
            if self.read_only or not self._in_range(sector, length):
                return S_IOERR, 0
            self._file.write(sector * SECTOR, payload)
            return S_OK, 0
        if request_type == T_FLUSH:
            if not self.read_only:
                self._file.flush()
            return S_OK, 0
        if request_type == T_GET_ID:
            if not data_out:
                return S_IOERR, 0
            identity = self.device_id.ljust(ID_BYTES, b"\0")[: len(data_out[0])]
            data_out[0][: len(identity)] = identity
            return S_OK, len(identity)
        if request_type in (T_DISCARD, T_WRITE_ZEROES):
            return (S_IOERR if self.read_only else self._discard(payload)), 0
        return S_UNSUPP, 0

    def _in_range(self, sector: int, length: int) -> bool:
        return length % SECTOR == 0 and sector + length // SECTOR <= self.capacity

    def _discard(self, payload: list[memoryview]) -> int:
        data = b"".join(bytes(b) for b in payload)
        for offset in range(0, len(data) - 15, 16):
            sector, count, _flags = struct.unpack_from("<QII", data, offset)
            if count > MAX_DISCARD_SECTORS or sector + count > self.capacity:
                return S_IOERR
            self._file.punch_hole(sector * SECTOR, count * SECTOR)
        return S_OK


def _head(buffers: list[memoryview], count: int) -> bytes:
    """The first ``count`` bytes of ``buffers`` (fewer if they are shorter), copying no more."""
    if buffers and len(buffers[0]) >= count:
        return bytes(buffers[0][:count])  # the usual case: a buffer of its own for the header
    out = bytearray()
    for buffer in buffers:
        out += buffer[: count - len(out)]
        if len(out) >= count:
            break
    return bytes(out)


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


__all__ = ["VirtioBlock"]
