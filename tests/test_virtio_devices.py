"""virtio-blk and virtio-rng through a real queue and a mock driver."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.testing.virtio_driver import Buffer, MockDriver
from kvmpy.virtio.devices import blk
from kvmpy.virtio.devices.blk import VirtioBlock
from kvmpy.virtio.devices.rng import VirtioRng
from kvmpy.virtio.queue import QueueError, SplitQueue

RAM = 1 << 22
HEADER, DATA, STATUS = 0x40000, 0x80000, 0x3F000


def setup(device, mem: GuestMemory) -> tuple[MockDriver, list[int]]:  # type: ignore[no-untyped-def]
    queue = SplitQueue(device.queue_sizes[0])
    driver = MockDriver(mem, queue, 0x10000, size=16)
    interrupts: list[int] = []
    device.activate(mem, [queue], device.features, interrupts.append)
    return driver, interrupts


def request(mem: GuestMemory, driver: MockDriver, kind: int, sector: int, data: list[Buffer]) -> None:
    mem.write(HEADER, struct.pack("<IIQ", kind, 0, sector))
    mem.write_u8(STATUS, 0xEE)
    driver.add([Buffer(HEADER, 16), *data, Buffer(STATUS, 1, writable=True)])


@pytest.fixture
def mem() -> GuestMemory:
    memory = GuestMemory.anonymous([(0, RAM)])
    yield memory
    memory.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 8 * 64)  # 128 KiB
    return path


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_read_write_flush_and_id(mem: GuestMemory, image: Path, direct: bool) -> None:
    device = VirtioBlock(image, device_id="disk-7", direct=direct)
    driver, interrupts = setup(device, mem)
    mem.write(DATA, b"\xab" * 1024)
    request(mem, driver, blk.T_OUT, 4, [Buffer(DATA, 1024)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK and interrupts == [0]
    request(mem, driver, blk.T_IN, 3, [Buffer(DATA, 2048, writable=True)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK
    assert mem.read(DATA + 512, 1024) == b"\xab" * 1024
    assert mem.read(DATA, 512) == bytes(range(256)) * 2
    assert driver.used_entries()[-1][1] == 2048 + 1
    request(mem, driver, blk.T_FLUSH, 0, [])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK
    request(mem, driver, blk.T_GET_ID, 0, [Buffer(DATA, 20, writable=True)])
    device.queue_notify(0)
    assert mem.read(DATA, 6) == b"disk-7"
    assert image.read_bytes()[4 * 512 : 6 * 512] == b"\xab" * 1024
    assert device.bounced == 0  # aligned guest buffers went to the file as they were
    device.close()


def test_direct_mode_bypasses_the_page_cache(mem: GuestMemory, image: Path) -> None:
    import fcntl
    import os

    device = VirtioBlock(image, direct=True)
    flags = fcntl.fcntl(device._file._fd, fcntl.F_GETFL)
    assert flags & os.O_DIRECT
    block_size = struct.unpack("<I", device.read_config(20, 4))[0]
    assert block_size in (512, 4096)  # what the host file system needs, told to the driver
    device.close()


@pytest.mark.parametrize("address_offset", [1, 8, 100])
def test_direct_mode_bounces_misaligned_guest_buffers(
    mem: GuestMemory, image: Path, address_offset: int
) -> None:
    """A driver that ignores the block size still gets its data; the VMM copies through a bounce buffer."""
    device = VirtioBlock(image, direct=True)
    driver, _ = setup(device, mem)
    mem.write(DATA + address_offset, b"\x5a" * 1024)
    request(mem, driver, blk.T_OUT, 8, [Buffer(DATA + address_offset, 1024)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK
    request(mem, driver, blk.T_IN, 7, [Buffer(DATA + address_offset + 4096, 1536, writable=True)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK
    contents = image.read_bytes()
    assert contents[8 * 512 : 10 * 512] == b"\x5a" * 1024
    assert contents[7 * 512 : 8 * 512] == bytes(range(256)) * 2  # its neighbours are untouched
    assert contents[10 * 512 : 11 * 512] == bytes(range(256)) * 2
    assert mem.read(DATA + address_offset + 4096, 1536) == contents[7 * 512 : 10 * 512]
    assert device.bounced == 2
    device.close()


def test_direct_mode_offers_whole_blocks_only(tmp_path: Path) -> None:
    image = tmp_path / "odd.img"
    image.write_bytes(bytes(64 * 1024 + 512))
    device = VirtioBlock(image, direct=True)
    block_size = struct.unpack("<I", device.read_config(20, 4))[0]
    assert device.capacity * 512 == (64 * 1024 + 512) // block_size * block_size
    device.close()


def test_errors_complete_with_a_status(mem: GuestMemory, image: Path) -> None:
    device = VirtioBlock(image, read_only=True)
    assert device.features & blk.F_RO
    driver, _ = setup(device, mem)
    request(mem, driver, blk.T_OUT, 0, [Buffer(DATA, 512)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_IOERR  # read-only
    request(mem, driver, blk.T_IN, 255, [Buffer(DATA, 1024, writable=True)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_IOERR  # past the end
    request(mem, driver, 99, 0, [])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_UNSUPP
    assert device.errors == 3
    device.close()


def test_discard_zeroes_the_range(mem: GuestMemory, image: Path) -> None:
    device = VirtioBlock(image)
    driver, _ = setup(device, mem)
    mem.write(DATA, struct.pack("<QII", 2, 4, 0))
    request(mem, driver, blk.T_DISCARD, 0, [Buffer(DATA, 16)])
    device.queue_notify(0)
    assert mem.read_u8(STATUS) == blk.S_OK
    assert image.read_bytes()[1024 : 3 * 1024] == bytes(2048)
    device.close()


def test_config_space_capacity(image: Path) -> None:
    device = VirtioBlock(image)
    assert struct.unpack("<Q", device.read_config(0, 8))[0] == 256
    assert struct.unpack("<I", device.read_config(20, 4))[0] == 512
    device.close()


def test_rng_fills_buffers(mem: GuestMemory) -> None:
    device = VirtioRng()
    driver, interrupts = setup(device, mem)
    driver.add([Buffer(DATA, 4096, writable=True)])
    device.queue_notify(0)
    assert driver.used_entries() == [(0, 4096)]
    assert mem.read(DATA, 4096) != bytes(4096)
    assert interrupts == [0]


@settings(max_examples=150, deadline=None)
@given(
    kind=st.integers(0, 20),
    sector=st.integers(0, 1 << 64 - 1),
    lengths=st.lists(st.integers(0, 5000), max_size=4),
    header_length=st.integers(0, 32),
    direct=st.booleans(),
    misalign=st.integers(0, 600),
)
def test_hostile_block_requests(
    tmp_path_factory, kind, sector, lengths, header_length, direct, misalign
) -> None:  # type: ignore[no-untyped-def]
    image = tmp_path_factory.mktemp("hostile") / "disk.img"
    image.write_bytes(bytes(64 * 1024))
    memory = GuestMemory.anonymous([(0, RAM)])
    device = VirtioBlock(image, direct=direct)
    driver, _ = setup(device, memory)
    memory.write(HEADER, struct.pack("<IIQ", kind, 0, sector % (1 << 64)))
    data = [
        Buffer(DATA + misalign + i * 8192, length, writable=bool(i % 2)) for i, length in enumerate(lengths)
    ]
    driver.add([Buffer(HEADER, header_length), *data, Buffer(STATUS, 1, writable=True)])
    try:
        device.queue_notify(0)
    except QueueError:
        pass
    assert len(image.read_bytes()) == 64 * 1024  # the image never grows
    device.close()
    memory.close()
