"""virtio-blk (virtio 1.x, 5.2) on a raw image file.

Requests carry a 16-byte header (type, sector), data buffers and a status
byte. Data moves straight between the image file (through the host's page
cache, or with O_DIRECT: see :mod:`disk_file`) and memoryviews of guest RAM:
no copies. Flush is fsync. A request the
driver got wrong (short header, a read-only device written, sectors past
the end, more segments than ``seg_max``) completes with an error status, and
so does one the host fails (EIO, ENOSPC from the image): every request taken
from the ring is completed. Only a broken ring resets the device.
"""

from __future__ import annotations

import logging
import struct
from pathlib import Path

from kvmpy.errors import ConfigError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.ratelimit import guest_log
from kvmpy.virtio.device import COMMON_FEATURES, TYPE_BLOCK, Interrupt
from kvmpy.virtio.devices.disk_file import DiskFile
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import DescriptorChain, SplitQueue
from kvmpy.virtio.throttle import Throttle

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
#: Data segments per request, advertised and enforced: with the header and status a request
#: fits a queue of 128, and preadv/pwritev stay far below IOV_MAX (1024) iovecs.
SEG_MAX = 126
#: Sectors per discard or write-zeroes segment (32 MiB): bounds the zero-fill fallback's time
#: on the event loop all devices share; Linux splits larger ranges itself.
MAX_DISCARD_SECTORS = 1 << 16
#: Segments per discard or write-zeroes request, advertised and enforced.
MAX_DISCARD_SEGMENTS = 1
DISCARD_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
#: Data bytes per request (1 GiB): far above what Linux sends (max_sectors_kb, 1280 KiB by
#: default), so aliased descriptors cannot hold the shared event loop for long, and the used
#: length (data + status) stays inside its 32 bits.
MAX_REQUEST_BYTES = 1 << 30
#: DiskConfig.cache_type values (Firecracker's): whether VIRTIO_BLK_F_FLUSH is offered.
CACHE_TYPES = ("Writeback", "Unsafe")

log = logging.getLogger("kvmpy.virtio")


class VirtioBlock:
    device_type = TYPE_BLOCK
    queue_sizes: tuple[int, ...] = (256,)

    def __init__(
        self,
        path: Path,
        *,
        read_only: bool = False,
        device_id: str = "",
        direct: bool = False,
        cache_type: str = "Writeback",
        throttle: Throttle | None = None,
    ) -> None:
        if cache_type not in CACHE_TYPES:
            raise ConfigError(f"disk {path}: cache type {cache_type!r} is not Writeback or Unsafe")
        self.guard = DeviceGuard()
        #: The rate limiter (bytes read or written, and requests); None: unlimited.
        self.throttle = throttle
        self._file = DiskFile(path, read_only=read_only, direct=direct)
        self.read_only = read_only
        self.device_id = (device_id or path.name).encode()[:ID_BYTES]
        self.features = COMMON_FEATURES | F_SEG_MAX | F_BLK_SIZE | F_DISCARD | F_WRITE_ZEROES
        #: "Unsafe": no flush offered, so the guest never waits for the host's disk.
        self.flushes = cache_type == "Writeback"
        if self.flushes:
            self.features |= F_FLUSH
        if read_only:
            self.features |= F_RO
        self._config = self._configuration()
        self._mem: GuestMemory | None = None
        self._queue: SplitQueue | None = None
        self._interrupt: Interrupt | None = None
        self.requests = 0
        #: Requests completed with an error status (the guest's mistakes and the host's failures).
        self.errors = 0
        #: Of those, the host's: the image failed an I/O.
        self.host_errors = 0

    def _configuration(self) -> bytes:
        """The device configuration space for the current image (capacity, limits)."""
        block_size = self._file.alignment
        # Whole blocks only: an O_DIRECT write of a partial last block would grow the file.
        self.capacity = self._file.size // block_size * block_size // SECTOR
        config = struct.pack("<QII4xI", self.capacity, 0, SEG_MAX, block_size)
        config = config.ljust(36, b"\0")
        # discard and write-zeroes limits (offsets 36-59)
        return config + struct.pack(
            "<IIIIIB3x",
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            1,  # discard sector alignment
            MAX_DISCARD_SECTORS,
            MAX_DISCARD_SEGMENTS,
            1,  # write zeroes may unmap
        )

    def replace_backing(self, path: Path) -> None:
        """Serve another image from now on (Firecracker's PATCH /drives after boot).

        The new file is opened first, so a bad path changes nothing; requests in
        flight finish on the old image (the device lock), then the capacity the
        driver reads is the new one's. The caller raises the configuration-change
        interrupt so the driver rereads it.
        """
        replacement = DiskFile(path, read_only=self.read_only, direct=self._file.direct)
        with self.guard.lock:
            old, self._file = self._file, replacement
            self._config = self._configuration()
        old.close()

    @property
    def bounced(self) -> int:
        """Requests copied through an aligned buffer (direct mode, misaligned guest memory)."""
        return self._file.bounced

    def close(self) -> None:
        self._file.close()
        if self.throttle is not None:
            self.throttle.close()

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
            self._serve()

    def _serve(self) -> None:
        mem, queue, interrupt = self._mem, self._queue, self._interrupt
        if mem is None or queue is None or interrupt is None:
            return
        done = False
        while not self._throttled(queue, mem) and (chain := queue.pop(mem)) is not None:
            written = self._handle(chain)
            queue.push(mem, chain.head, written)
            done = True
        if done and queue.needs_interrupt(mem):
            interrupt(0)

    def _throttled(self, queue: SplitQueue, mem: GuestMemory) -> bool:
        """Work waits and we are over the rate limit: the queue waits for the throttle's timer."""
        throttle = self.throttle
        return throttle is not None and queue.has_work(mem) and throttle.blocked(self._retry)

    def _retry(self) -> None:
        self.guard.run(self._serve)  # the event loop's timer: under the lock, errors contained

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
        try:
            status, written = self._dispatch(request_type, sector, payload, data_out)
        except OSError as error:  # the host's failure: this request fails, the device goes on
            status, written = S_IOERR, 0
            self.host_errors += 1
            name, message = self.device_id.decode(errors="replace"), "virtio-blk %s: I/O error: %s"
            guest_log.warning(log, ("virtio-blk-io", id(self)), message, name, str(error))  # no traceback
        if status != S_OK:
            self.errors += 1
        if self.throttle is not None:  # bytes count for reads and writes, every request as one op
            moved = payload if request_type == T_OUT else data_out if request_type == T_IN else []
            self.throttle.spend(sum(map(len, moved)))
        status_buffer[0] = status
        return written + 1

    def _dispatch(
        self, request_type: int, sector: int, payload: list[memoryview], data_out: list[memoryview]
    ) -> tuple[int, int]:
        if request_type == T_IN:
            if not self._in_range(sector, data_out):
                return S_IOERR, 0
            return S_OK, self._file.read(sector * SECTOR, data_out)
        if request_type == T_OUT:
            if self.read_only or not self._in_range(sector, payload):
                return S_IOERR, 0
            self._file.write(sector * SECTOR, payload)
            return S_OK, 0
        if request_type == T_FLUSH:
            if not self.flushes:
                return S_UNSUPP, 0  # not offered: the driver should not have asked
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

    def _in_range(self, sector: int, data: list[memoryview]) -> bool:
        """Whole sectors inside the disk, at most SEG_MAX segments and MAX_REQUEST_BYTES."""
        length = sum(map(len, data))
        if len(data) > SEG_MAX or length > MAX_REQUEST_BYTES:
            return False
        return length % SECTOR == 0 and sector + length // SECTOR <= self.capacity

    def _discard(self, payload: list[memoryview]) -> int:
        """One 16-byte segment (MAX_DISCARD_SEGMENTS), read alone: the payload is never copied."""
        if sum(map(len, payload)) != DISCARD_SEGMENT.size * MAX_DISCARD_SEGMENTS:
            return S_IOERR
        sector, count, _flags = DISCARD_SEGMENT.unpack(_head(payload, DISCARD_SEGMENT.size))
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
