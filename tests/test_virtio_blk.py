"""virtio-blk against a hostile driver and a failing host: every request completes with a status,
every resource a request can make the VMM spend is bounded."""

from __future__ import annotations

import errno
import os
import struct
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.testing.virtio_driver import Buffer, MockDriver
from kvmpy.virtio.devices import blk, disk_file
from kvmpy.virtio.devices.blk import VirtioBlock
from kvmpy.virtio.queue import QueueError, SplitQueue

RAM = 1 << 24
HEADER, STATUS, DATA = 0x3E000, 0x3F000, 0x100000


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory.anonymous([(0, RAM)])
    yield memory
    memory.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 8 * 64)  # 128 KiB
    return path


def activate(device: VirtioBlock, mem: GuestMemory, *, slots: int = 16) -> MockDriver:
    queue = SplitQueue(device.queue_sizes[0])
    driver = MockDriver(mem, queue, 0x10000, size=16, indirect_slots=slots)
    device.activate(mem, [queue], device.features, lambda index: None)
    return driver


def submit(
    mem: GuestMemory,
    driver: MockDriver,
    kind: int,
    sector: int,
    data: list[Buffer],
    *,
    indirect: bool = False,
) -> int:
    mem.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
    mem.write_u8(STATUS, 0xEE)
    return driver.add([Buffer(HEADER, 16), *data, Buffer(STATUS, 1, writable=True)], indirect=indirect)


# --- chains and segments ----------------------------------------------------------------
def test_more_segments_than_seg_max_complete_with_ioerr(mem: GuestMemory, image: Path) -> None:
    """The device offers seg_max 126; a request with more data segments fails, and completes."""
    device = VirtioBlock(image)
    queue = SplitQueue(256)  # a queue long enough that only seg_max is broken
    driver = MockDriver(mem, queue, 0x10000, size=256, indirect_slots=256)
    device.activate(mem, [queue], device.features, lambda index: None)
    data = [Buffer(DATA + 512 * i, 512, writable=True) for i in range(blk.SEG_MAX + 4)]
    head = submit(mem, driver, blk.T_IN, 0, data, indirect=True)
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_IOERR
    assert driver.used_entries() == [(head, 1)]
    device.close()


def test_a_chain_longer_than_the_queue_is_refused_by_the_walk(mem: GuestMemory) -> None:
    queue = SplitQueue(16)
    driver = MockDriver(mem, queue, 0x10000, size=16, indirect_slots=32)
    driver.add([Buffer(DATA + 16 * i, 16) for i in range(17)], indirect=True)
    with pytest.raises(QueueError, match="longer than the queue size 16"):
        queue.pop(mem)


def test_more_than_iov_max_buffers_never_reach_preadv(mem: GuestMemory, image: Path) -> None:
    """Direct descriptors continuing into an indirect table: 1,200 buffers in one chain. Before,
    preadv raised EINVAL (IOV_MAX) out of the device and the popped chain was never completed."""
    device = VirtioBlock(image)
    queue = SplitQueue(256)
    driver = MockDriver(mem, queue, 0x10000, size=256)
    device.activate(mem, [queue], device.features, lambda index: None)
    table = 0x200000
    entries = [struct.pack("<QIHH", DATA, 512, 2 | 1, i + 1) for i in range(1000)]
    entries[-1] = struct.pack("<QIHH", STATUS, 1, 2, 0)
    mem.write(table, b"".join(entries))
    mem.write(HEADER, struct.pack("<IIQ", blk.T_IN, 0, 0))
    direct = [struct.pack("<QIHH", HEADER, 16, 1, 1)]
    direct += [struct.pack("<QIHH", DATA, 512, 2 | 1, i + 2) for i in range(199)]
    direct.append(struct.pack("<QIHH", table, 16 * len(entries), 4, 0))
    mem.write(driver.desc, b"".join(direct))
    mem.write_u16(driver.avail + 4, 0)
    mem.write_u16(driver.avail + 2, 1)
    with pytest.raises(QueueError, match="longer than the queue"):
        device.queue_notify(0)
    device.close()


# --- host errors --------------------------------------------------------------------------
@pytest.mark.parametrize("failing", ["preadv", "pwritev"])
@pytest.mark.parametrize("code", [errno.EIO, errno.ENOSPC])
def test_host_io_errors_complete_with_ioerr(
    mem: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch, failing: str, code: int
) -> None:
    device = VirtioBlock(image)
    driver = activate(device, mem)

    def broken(*args: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, failing, broken)
    kind = blk.T_IN if failing == "preadv" else blk.T_OUT
    head = submit(mem, driver, kind, 0, [Buffer(DATA, 1024, writable=kind == blk.T_IN)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_IOERR
    assert driver.used_entries() == [(head, 1)]
    assert device.errors == 1
    monkeypatch.undo()
    head = submit(mem, driver, blk.T_IN, 0, [Buffer(DATA, 512, writable=True)])
    device.queue_notify(0)  # the device goes on
    assert mem.read_u8(STATUS) == blk.S_OK and driver.used_entries() == [(head, 513)]
    device.close()


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_short_transfers_are_continued(
    mem: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    """The kernel may move fewer bytes than asked (it caps one call at 2 GiB - 4 KiB): the rest
    is transferred by further calls, never reported done when it is not."""
    cap = 4096
    real = {name: getattr(os, name) for name in ("preadv", "pwritev")}

    def capped_vector(name: str):  # type: ignore[no-untyped-def]
        def call(fd: int, buffers: list[memoryview], offset: int) -> int:
            out, room = [], cap
            for buffer in buffers:
                if room <= 0:
                    break
                out.append(memoryview(buffer)[:room])
                room -= len(out[-1])
            return int(real[name](fd, out, offset))

        return call

    monkeypatch.setattr(os, "preadv", capped_vector("preadv"))
    monkeypatch.setattr(os, "pwritev", capped_vector("pwritev"))
    device = VirtioBlock(image, direct=direct)
    driver = activate(device, mem)
    misalign = 1 if direct else 0  # through the bounce buffer in direct mode
    payload = (bytes(range(251)) * 66)[: 16 * 1024]  # a pattern that does not repeat per block
    mem.write(DATA + misalign, payload)
    submit(mem, driver, blk.T_OUT, 8, [Buffer(DATA + misalign, 8192), Buffer(DATA + misalign + 8192, 8192)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK
    assert image.read_bytes()[8 * 512 : 8 * 512 + len(payload)] == payload
    mem.fill(DATA, 0x10000)
    head = submit(mem, driver, blk.T_IN, 8, [Buffer(DATA + 0x8000 + misalign, 16 * 1024, writable=True)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK
    assert mem.read(DATA + 0x8000 + misalign, len(payload)) == payload
    assert driver.used_entries()[-1] == (head, 16 * 1024 + 1)
    device.close()


def test_a_write_the_file_takes_nothing_of_is_an_error(
    mem: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "pwritev", lambda fd, buffers, offset: 0)
    device = VirtioBlock(image)
    driver = activate(device, mem)
    head = submit(mem, driver, blk.T_OUT, 0, [Buffer(DATA, 1024)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_IOERR and driver.used_entries() == [(head, 1)]
    device.close()


@pytest.mark.parametrize("gib", [2, 4])
def test_requests_past_the_size_limit_are_refused_before_any_io(tmp_path: Path, gib: int) -> None:
    """Aliased descriptors describe more data than guest RAM holds: past 2 GiB one preadv moves
    less than asked, past 4 GiB the used length overflows its 32 bits. Refused, and completed."""
    image = tmp_path / "big.img"
    with image.open("wb") as handle:
        handle.truncate(5 << 30)  # sparse
    memory = GuestMemory.anonymous([(0, 64 << 20)])
    device = VirtioBlock(image)
    queue = SplitQueue(256)
    driver = MockDriver(memory, queue, 0x10000, size=256, indirect_slots=128)
    device.activate(memory, [queue], device.features, lambda index: None)
    count = gib * 1024 // 48 + 1
    head = submit(memory, driver, blk.T_IN, 0, [Buffer(DATA, 48 << 20, writable=True)] * count, indirect=True)
    device.queue_notify(0)
    assert memory.read_u8(STATUS) == blk.S_IOERR
    assert driver.used_entries() == [(head, 1)]
    device.close()
    memory.close()


# --- discard and write-zeroes -----------------------------------------------------------------
@pytest.mark.parametrize("kind", [blk.T_DISCARD, blk.T_WRITE_ZEROES])
def test_discard_takes_one_segment_and_copies_no_payload(
    mem: GuestMemory, image: Path, monkeypatch: pytest.MonkeyPatch, kind: int
) -> None:
    """The device advertises one segment per request: 64 aliased segments over a 4 MiB payload
    are refused without reading the payload whole or punching 64 holes."""
    device = VirtioBlock(image)
    driver = activate(device, mem)
    holes: list[tuple[int, int]] = []
    monkeypatch.setattr(device._file, "punch_hole", lambda offset, length: holes.append((offset, length)))
    mem.write(DATA, struct.pack("<QII", 2, 4, 0) * (4 << 16))
    tracemalloc.start()
    head = submit(mem, driver, kind, 0, [Buffer(DATA, 4 << 20)])
    device.queue_notify(0)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert mem.read_u8(STATUS) == blk.S_IOERR and driver.used_entries() == [(head, 1)]
    assert holes == [] and peak < 64 * 1024
    mem.write(DATA, struct.pack("<QII", 2, 4, 0))
    submit(mem, driver, kind, 0, [Buffer(DATA, 16)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK and holes == [(1024, 2048)]
    device.close()


def test_zero_fill_fallback_is_chunked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where fallocate cannot punch holes, zeroes are written from a bounded buffer."""
    image = tmp_path / "disk.img"
    image.write_bytes(b"\xaa" * (8 << 20))
    disk = disk_file.DiskFile(image)

    class NoFallocate:
        def fallocate(self, *args: object) -> int:
            return -1

    monkeypatch.setattr(disk_file, "_libc", lambda: NoFallocate())
    tracemalloc.start()
    disk.punch_hole(512, (8 << 20) - 1024)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    disk.close()
    contents = image.read_bytes()
    assert contents[:512] == b"\xaa" * 512 and contents[-512:] == b"\xaa" * 512
    assert contents[512:-512] == bytes((8 << 20) - 1024)
    assert peak <= disk_file.ZERO_CHUNK + 64 * 1024


# --- direct=on ------------------------------------------------------------------------------
def test_direct_bounce_buffer_is_bounded(
    mem: GuestMemory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misaligned request goes through a bounce buffer of a fixed size, not one as large as the
    request (aliased descriptors made a 16 MiB guest grow the VMM by 265 MiB)."""
    image = tmp_path / "disk.img"
    with image.open("wb") as handle:
        handle.truncate(64 << 20)
    device = VirtioBlock(image, direct=True)
    driver = activate(device, mem)
    sizes: list[int] = []
    real_mmap = disk_file.mmap.mmap

    def recording_mmap(fd: int, length: int, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        sizes.append(length)
        return real_mmap(fd, length, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(disk_file.mmap, "mmap", recording_mmap)
    mem.write(DATA + 1, b"\x5a" * (4 << 20))
    submit(mem, driver, blk.T_OUT, 0, [Buffer(DATA + 1, 4 << 20)] * 8)  # 32 MiB from 4 MiB of RAM
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK
    submit(mem, driver, blk.T_IN, 1, [Buffer(DATA + 3, 4 << 20, writable=True)] * 4)
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK
    assert mem.read(DATA + 3, 4 << 20) == b"\x5a" * (4 << 20)
    assert sizes and max(sizes) <= disk_file.BOUNCE_SIZE
    with image.open("rb") as handle:
        assert handle.read(32 << 20) == b"\x5a" * (32 << 20)
    device.close()


# --- cache type -------------------------------------------------------------------------------
def test_cache_type_decides_whether_flush_is_offered(mem: GuestMemory, image: Path) -> None:
    assert VirtioBlock(image, cache_type="Writeback").features & blk.F_FLUSH
    device = VirtioBlock(image, cache_type="Unsafe")
    assert not device.features & blk.F_FLUSH
    driver = activate(device, mem)
    submit(mem, driver, blk.T_FLUSH, 0, [])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_UNSUPP
    device.close()
