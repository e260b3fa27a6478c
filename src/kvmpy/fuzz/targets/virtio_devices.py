"""Each virtio device's request parser, driven the way a guest drives it: through the PCI
transport's registers, rings built by the mock driver, and raw bytes poked into RAM.

An input is a list of operations (an opcode byte, then its arguments)::

    0 write BAR 0    offset u16, size (1, 2, 4, 8), value        common, ISR, device, notify areas
    1 read BAR 0     offset u16, size
    2 poke RAM       offset u32, length u8, bytes                anywhere in RAM region 0
    3 notify         queue u8                                    the ioeventfd path
    4 set up         a well-behaved driver's initialisation: features, every queue, DRIVER_OK
                     (the first MAX_SET_UPS of an input; later ones are skipped)
    5 add a chain    queue u8, flags u8 (bit 0 indirect), count u8, then per buffer: an address
                     (kind u8, u32: see virtqueue.address), length u16, writable u8
    6 host event     length u8, bytes: a packet from the tap (net), console input (console)
    7 write MSI-X    offset u16, size, value
    8 write PCI config   offset u8, size (1, 2, 4), value

After the operations the device is reset by a well-behaved driver, which
must then get a correct answer to a known request.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvmpy.fuzz.guarded_memory import GuardedMemory
from kvmpy.fuzz.harness import KnownIssue, Reader, Target, Writer, check
from kvmpy.fuzz.targets.virtqueue import address
from kvmpy.testing.virtio_driver import Buffer, MockDriver
from kvmpy.virtio import pci_transport as pt
from kvmpy.virtio.device import VirtioDevice
from kvmpy.virtio.devices import blk
from kvmpy.virtio.devices.console import VirtioConsole
from kvmpy.virtio.devices.net import VirtioNet
from kvmpy.virtio.devices.rng import VirtioRng
from kvmpy.virtio.pci_transport import VirtioPciTransport
from kvmpy.vmm.console import ConsoleOutput

RAM0 = (0, 0x20000)
RAM1 = (0x100000, 0x4000)
QUEUE_BASE, QUEUE_STRIDE, QUEUE_SIZE = 0x10000, 0x4000, 16
DATA = 0x4000  # buffers of the well-behaved driver's requests
BAR0_ADDRESS, BAR1_ADDRESS = 0xC000_0000, 0xC000_4000
SIZES = (1, 2, 4, 8)
MAX_OPERATIONS = 256
#: Set-ups per input. Each is a reset and some twenty register accesses, and random bytes decode
#: to one in nine operations, so uncapped inputs held dozens (a seventh of virtio-blk's corpus
#: held 40 or more, libFuzzer rewarding each higher hit count as a new feature) and two thirds
#: of the campaign's time went to repeating them. Four still let an input set up, break the
#: device, and set it up again, more than once.
MAX_SET_UPS = 4
MAX_CHAIN = 64
(WRITE_BAR0, READ_BAR0, POKE, NOTIFY, SET_UP, ADD_CHAIN, HOST_EVENT, WRITE_MSIX, WRITE_CONFIG) = range(9)
OPERATIONS = 9


class RecordingMsi:
    """An MsiSender that only counts: the fuzzer does not care where interrupts go."""

    def __init__(self) -> None:
        self.sent = 0

    def send(self, vector: int, address: int, data: int) -> None:
        self.sent += 1

    def changed(self, vector: int, address: int, data: int) -> None:
        pass


class FakeTap:
    """A tap stand-in: one end of a datagram socket pair (one packet per datagram, like a tap)."""

    def __init__(self) -> None:
        self._device_end, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._device_end.setblocking(False)
        self.peer.setblocking(False)
        self.fd = self._device_end.fileno()
        self.offloads = 0

    def set_offloads(self, flags: int) -> None:
        self.offloads = flags

    def discard_incoming(self) -> None:
        """Drop the packets waiting for the device (sent by earlier host events)."""
        with contextlib.suppress(BlockingIOError):
            while True:
                self._device_end.recv(1 << 17)

    def drain(self) -> list[bytes]:
        """The packets the device sent."""
        packets = []
        with contextlib.suppress(BlockingIOError):
            while True:
                packets.append(self.peer.recv(1 << 17))
        return packets

    def close(self) -> None:
        self._device_end.close()
        self.peer.close()


class DeviceTarget:
    """One virtio device behind its PCI transport, with the shared operations and checks."""

    name = ""
    max_len = 8192
    invariants: tuple[str, ...] = (
        "no register access, notification or host event raises: the transport contains guest "
        "errors by marking the device DEVICE_NEEDS_RESET",
        "the guard pages around RAM are untouched",
        "after any input, a driver that resets the device and sets it up again gets correct "
        "answers, and the device is not marked as needing reset",
    )
    known: tuple[KnownIssue, ...] = ()

    def __init__(self) -> None:
        self.mem = GuardedMemory([RAM0, RAM1])
        self.msi = RecordingMsi()

    # --- what each device provides ------------------------------------------------------
    def make_device(self) -> VirtioDevice:
        raise NotImplementedError

    def host_event(self, data: bytes) -> None:
        """Input from the host side of the device (none by default)."""

    def poll(self) -> None:
        """What the event loop would run for the device's host side (nothing by default)."""

    def check_host(self) -> None:
        """The device's host-side invariants after an input (none by default)."""

    def well_behaved_request(self, drivers: list[MockDriver]) -> None:
        """A correct request after reset, with its answer checked."""
        raise NotImplementedError

    def seed_requests(self) -> list[bytes]:
        """Operations (after set-up) of a few valid requests, one seed each."""
        raise NotImplementedError

    # --- one input ----------------------------------------------------------------------
    def run(self, data: bytes) -> None:
        self.mem.clear()
        self.device = self.make_device()
        self.transport = VirtioPciTransport(
            self.device, self.mem, self.msi, BAR0_ADDRESS, BAR1_ADDRESS, lambda _areas: None, self._intx
        )
        self.transport.bar_mapped(0, BAR0_ADDRESS)
        bar0 = self.transport.bar_device(0)
        assert bar0 is not None
        self.bar0 = bar0  # looked up once: every register access of the input goes through it
        self.drivers: list[MockDriver | None] = [None] * len(self.transport.queues)
        self._set_ups_left = MAX_SET_UPS
        try:
            reader = Reader(data)
            for _ in range(MAX_OPERATIONS):
                if not reader.remaining:
                    break
                self._operation(reader)
            self.poll()
            self.mem.check_canaries()
            self.check_host()
            self._recover()
            self.mem.check_canaries()
        finally:
            self.close_device()

    def close_device(self) -> None:
        """Release the device's host resources (files, sockets)."""

    def _intx(self, level: bool) -> None:
        pass

    def _operation(self, reader: Reader) -> None:
        opcode = reader.u8() % OPERATIONS
        bar0 = self.bar0
        if opcode in (WRITE_BAR0, READ_BAR0, WRITE_MSIX):
            offset, size = reader.u16(), SIZES[reader.u8() % 4]
            span = pt.BAR0_SIZE if opcode != WRITE_MSIX else 0x1000
            offset %= span
            if offset + size > span:
                return
            if opcode == READ_BAR0:
                buffer = bytearray(size)
                bar0.read(offset, memoryview(buffer))
            elif opcode == WRITE_BAR0:
                bar0.write(offset, reader.uint(size).to_bytes(size, "little"))
            else:
                self.transport.msix.write(offset, reader.uint(size).to_bytes(size, "little"))
        elif opcode == POKE:
            offset, length = reader.u32() % RAM0[1], reader.u8()
            self.mem.write(RAM0[0] + offset, reader.take(min(length, RAM0[1] - offset)))
        elif opcode == NOTIFY:
            self.transport.notify(reader.u8() % (len(self.transport.queues) + 1))
        elif opcode == SET_UP:
            if self._set_ups_left:
                self._set_ups_left -= 1
                self._set_up()
        elif opcode == ADD_CHAIN:
            self._add_chain(reader)
        elif opcode == HOST_EVENT:
            self.host_event(reader.take(reader.u8()))
        else:
            offset, size = reader.u8(), (1, 2, 4)[reader.u8() % 3]
            if offset + size <= 0x100:
                self.transport.config.write(offset, size, reader.uint(size))
                self.transport.config_written(offset, size)

    def _add_chain(self, reader: Reader) -> None:
        queue, flags, count = reader.u8(), reader.u8(), min(reader.u8(), MAX_CHAIN)
        buffers = []
        for _ in range(count):
            at = address(reader.u8(), reader.u32())
            buffers.append(Buffer(at, reader.u16(), writable=bool(reader.u8() & 1)))
        driver = self.drivers[queue % len(self.drivers)]
        if driver is None or not buffers:
            return
        with contextlib.suppress(Exception):  # the mock driver's own writes may leave RAM: skip them
            driver.add(buffers, indirect=bool(flags & 1))

    # --- the well-behaved driver --------------------------------------------------------
    def _write(self, offset: int, size: int, value: int) -> None:
        self.bar0.write(offset, value.to_bytes(size, "little"))

    def _read(self, offset: int, size: int) -> int:
        buffer = bytearray(size)
        self.bar0.read(offset, memoryview(buffer))
        return int.from_bytes(buffer, "little")

    def _set_up(self) -> list[MockDriver]:
        """Reset, negotiate every offered feature, lay out every queue, DRIVER_OK."""
        self._write(20, 1, 0)
        self._write(20, 1, pt.STATUS_ACKNOWLEDGE | pt.STATUS_DRIVER)
        features = 0
        for select in (0, 1):
            self._write(0, 4, select)
            features |= self._read(4, 4) << (32 * select)
        for select in (0, 1):
            self._write(8, 4, select)
            self._write(12, 4, (features >> (32 * select)) & 0xFFFF_FFFF)
        self._write(20, 1, pt.STATUS_ACKNOWLEDGE | pt.STATUS_DRIVER | pt.STATUS_FEATURES_OK)
        drivers = []
        for index in range(len(self.transport.queues)):
            base = QUEUE_BASE + QUEUE_STRIDE * index
            self._write(22, 2, index)
            self._write(24, 2, QUEUE_SIZE)
            driver = MockDriver(self.mem, None, base, size=QUEUE_SIZE, configure=False)
            for offset, value in ((32, driver.desc), (40, driver.avail), (48, driver.used)):
                self._write(offset, 8, value)
            self._write(28, 2, 1)
            drivers.append(driver)
        self._write(20, 1, 0x0F)
        self.drivers = list(drivers)
        return drivers

    def _recover(self) -> None:
        drivers = self._set_up()
        status = self._read(20, 1)
        check(status == 0x0F, f"a well-behaved set-up after reset left status {status:#x}")
        self.well_behaved_request(drivers)
        self.poll()
        status = self._read(20, 1)
        check(not status & pt.STATUS_NEEDS_RESET, "a well-behaved request after reset broke the device")

    def seeds(self) -> list[bytes]:
        set_up = bytes([SET_UP])
        return [set_up, *(set_up + ops for ops in self.seed_requests())]


def chain(queue: int, buffers: list[tuple[int, int, bool]], indirect: bool = False) -> bytes:
    """The ADD_CHAIN operation for ``buffers`` of (RAM 0 offset, length, writable)."""
    out = Writer().u8(ADD_CHAIN).u8(queue).u8(int(indirect)).u8(len(buffers))
    for at, length, writable in buffers:
        out.u8(0).u32(at).u16(length).u8(int(writable))
    return out.bytes()


def poke(at: int, data: bytes) -> bytes:
    return Writer().u8(POKE).u32(at).u8(len(data)).raw(data).bytes()


def notify(queue: int) -> bytes:
    return bytes([NOTIFY, queue])


# --- virtio-blk ----------------------------------------------------------------------------
class BlockTarget(DeviceTarget):
    name = "virtio-blk"
    IMAGE_SIZE = 64 * 1024
    invariants: tuple[str, ...] = (
        *DeviceTarget.invariants,
        "no file but the configured image is written, and the image never grows past its size",
        "a read of sector 0 after reset returns the image's bytes; GET_ID returns the device id",
    )

    def __init__(self) -> None:
        super().__init__()
        # Under TMPDIR, which the runner gives each engine and removes after it.
        self.directory = Path(tempfile.mkdtemp(prefix="kvmpy-fuzz-blk-"))
        self.image = self.directory / "disk.img"
        self._pristine = bytes(range(256)) * (self.IMAGE_SIZE // 256)
        self.image.write_bytes(self._pristine)

    def make_device(self) -> VirtioDevice:
        """The device on the image as it was made: an earlier input's writes are undone first,
        so every input starts from the same disk and a crash replays from its input alone."""
        with self.image.open("r+b") as handle:
            handle.write(self._pristine)
        self._block = blk.VirtioBlock(self.image, device_id="fuzz-disk")
        return self._block

    def close_device(self) -> None:
        self._block.close()

    def check_host(self) -> None:
        files = sorted(p.name for p in self.directory.iterdir())
        check(files == ["disk.img"], f"files appeared beside the image: {files}")
        size = self.image.stat().st_size
        check(size == self.IMAGE_SIZE, f"the image grew to {size} bytes")

    def well_behaved_request(self, drivers: list[MockDriver]) -> None:
        mem, driver = self.mem, drivers[0]
        mem.write(DATA, struct.pack("<IIQ", blk.T_IN, 0, 0))
        mem.write_u8(DATA + 0x1000, 0xEE)
        driver.add([Buffer(DATA, 16), Buffer(DATA + 0x200, 512, True), Buffer(DATA + 0x1000, 1, True)])
        mem.write(DATA + 0x1100, struct.pack("<IIQ", blk.T_GET_ID, 0, 0))
        driver.add(
            [Buffer(DATA + 0x1100, 16), Buffer(DATA + 0x1200, 20, True), Buffer(DATA + 0x1001, 1, True)]
        )
        self.transport.notify(0)
        check(mem.read_u8(DATA + 0x1000) == blk.S_OK and mem.read_u8(DATA + 0x1001) == blk.S_OK,
              "a well-behaved read or GET_ID failed after reset")  # fmt: skip
        with self.image.open("rb") as handle:
            sector0 = handle.read(512)
        check(mem.read(DATA + 0x200, 512) == sector0, "sector 0 read back wrong after reset")
        check(mem.read(DATA + 0x1200, 9) == b"fuzz-disk", "GET_ID answered wrong after reset")
        check([length for _, length in driver.used_entries()][-2:] == [513, 21], "wrong used lengths")

    def seed_requests(self) -> list[bytes]:
        def request(kind: int, sector: int, data: list[tuple[int, int, bool]]) -> bytes:
            header = poke(0x8000, struct.pack("<IIQ", kind, 0, sector))
            return header + chain(0, [(0x8000, 16, False), *data, (0x8800, 1, True)]) + notify(0)

        write = poke(0x9000, b"\xab" * 64) + request(blk.T_OUT, 2, [(0x9000, 512, False)])
        read = request(blk.T_IN, 1, [(0x9000, 1024, True)])
        flush_id = request(blk.T_FLUSH, 0, []) + request(blk.T_GET_ID, 0, [(0x9000, 20, True)])
        discard = poke(0x9000, struct.pack("<QII", 4, 8, 0)) + request(
            blk.T_DISCARD, 0, [(0x9000, 16, False)]
        )
        zeroes = poke(0x9000, struct.pack("<QII", 8, 2, 0)) + request(
            blk.T_WRITE_ZEROES, 0, [(0x9000, 16, False)]
        )
        unknown = request(99, 0, []) + request(blk.T_IN, 1 << 40, [(0x9000, 512, True)])
        return [write, read, flush_id, discard, zeroes, unknown, read + write + flush_id]


# --- virtio-rng ----------------------------------------------------------------------------
class RngTarget(DeviceTarget):
    name = "virtio-rng"
    invariants = (*DeviceTarget.invariants, "a 64-byte request after reset is filled, all 64 bytes")

    def make_device(self) -> VirtioDevice:
        return VirtioRng()

    def well_behaved_request(self, drivers: list[MockDriver]) -> None:
        drivers[0].add([Buffer(DATA, 64, writable=True)])
        self.transport.notify(0)
        check(drivers[0].used_entries() == [(0, 64)], "a 64-byte entropy request was not filled")

    def seed_requests(self) -> list[bytes]:
        one = chain(0, [(0x9000, 64, True)]) + notify(0)
        many = chain(0, [(0x9000, 4096, True), (0xA000, 100, True)], indirect=True) + notify(0)
        return [one, many, one + one + many]


# --- virtio-console ------------------------------------------------------------------------
class ConsoleTarget(DeviceTarget):
    name = "virtio-console"
    invariants: tuple[str, ...] = (
        *DeviceTarget.invariants,
        "console output is exactly the bytes of the transmit buffers (through kvmpy's ConsoleOutput)",
        "host input after reset reaches a posted receive buffer",
    )

    def make_device(self) -> VirtioDevice:
        self.output = ConsoleOutput(None)
        self.console = VirtioConsole(self.output.write)
        return self.console

    def host_event(self, data: bytes) -> None:
        taken = self.console.enqueue_input(data)
        check(0 <= taken <= len(data), f"enqueue_input took {taken} of {len(data)} bytes")

    def well_behaved_request(self, drivers: list[MockDriver]) -> None:
        before = self.output.bytes_written
        self.mem.write(DATA, b"hello, console")
        drivers[1].add([Buffer(DATA, 14)])
        self.transport.notify(1)
        check(self.output.bytes_written - before == 14, "14 bytes sent, not 14 written to the console")
        # Input the host gave before the reset is still owed to the guest: take it all first.
        # (The same first buffer as the next chain's: "typed" lands there whichever chain takes it.)
        drivers[0].add([Buffer(DATA + 0x100, 0x1000, writable=True)] * 16, indirect=True)
        self.transport.notify(0)
        drivers[0].add([Buffer(DATA + 0x100, 64, writable=True)])
        self.transport.notify(0)
        self.console.enqueue_input(b"typed")
        used = drivers[0].used_entries()
        check(bool(used) and used[-1][1] == 5, f"host input did not arrive: {used}")
        check(self.mem.read(DATA + 0x100, 5) == b"typed", "host input arrived wrong")

    def seed_requests(self) -> list[bytes]:
        send = poke(0x9000, b"Linux version 6.1\n") + chain(1, [(0x9000, 18, False)]) + notify(1)
        receive = chain(0, [(0xA000, 64, True)]) + notify(0) + bytes([HOST_EVENT, 3]) + b"ls\n"
        pending = (
            bytes([HOST_EVENT, 4]) + b"abcd" + chain(0, [(0xA000, 2, True), (0xA100, 2, True)]) + notify(0)
        )
        return [send, receive, pending, send + receive]


# --- virtio-net ----------------------------------------------------------------------------
class NetTarget(DeviceTarget):
    name = "virtio-net"
    HEADER = 12
    invariants: tuple[str, ...] = (
        *DeviceTarget.invariants,
        "the receive handler the event loop runs never raises",
        "after reset, a transmitted packet reaches the tap whole and a packet from the tap fills "
        "a posted receive buffer",
    )

    def make_device(self) -> VirtioDevice:
        self.tap = FakeTap()
        self.watched: dict[int, Callable[[], None]] = {}
        self.net = VirtioNet(self.tap, b"\x52\x54\x00\x12\x34\x56", self._watch, self._unwatch)  # type: ignore[arg-type]
        return self.net

    def _watch(self, fd: int, handler: Callable[[], None]) -> None:
        self.watched[fd] = handler

    def _unwatch(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def close_device(self) -> None:
        self.net.close()

    def host_event(self, data: bytes) -> None:
        with contextlib.suppress(BlockingIOError):
            self.tap.peer.send(data)
        self.poll()

    def poll(self) -> None:
        """The event loop: run the receive handler while it is watched (a few rounds at most)."""
        for _ in range(4):
            handler = self.watched.get(self.tap.fd)
            if handler is None:
                return
            handler()

    def well_behaved_request(self, drivers: list[MockDriver]) -> None:
        self.tap.drain()
        self.tap.discard_incoming()
        packet = bytes(self.HEADER) + b"\xff" * 6 + b"\x52\x54\x00\x12\x34\x56" + b"\x08\x00" + b"ping"
        self.mem.write(DATA, packet)
        drivers[1].add([Buffer(DATA, self.HEADER), Buffer(DATA + self.HEADER, len(packet) - self.HEADER)])
        self.transport.notify(1)
        check(self.tap.drain() == [packet], "a transmitted packet did not reach the tap whole")
        drivers[0].add([Buffer(DATA + 0x800, 1526, writable=True)])
        self.transport.notify(0)
        self.tap.peer.send(packet)
        self.poll()
        check(drivers[0].used_entries()[-1:] == [(0, len(packet))], "a packet from the tap was not received")
        # The device fills in the header's num_buffers (one buffer); the rest is the tap's.
        expected = packet[:10] + b"\1\0" + packet[12:]
        check(self.mem.read(DATA + 0x800, len(packet)) == expected, "a received packet arrived wrong")

    def seed_requests(self) -> list[bytes]:
        frame = bytes(self.HEADER) + b"\xff" * 6 + b"\x52\x54\x00\x00\x00\x01\x08\x06" + b"arp"
        send = poke(0x9000, frame) + chain(
            1, [(0x9000, self.HEADER, False), (0x900C, len(frame) - 12, False)]
        )
        send += notify(1)
        receive = chain(0, [(0xA000, 1526, True)]) + notify(0) + bytes([HOST_EVENT, len(frame)]) + frame
        small = chain(0, [(0xA000, 4, True)]) + notify(0) + bytes([HOST_EVENT, len(frame)]) + frame
        return [send, receive, small, send + receive]


FACTORIES: dict[str, Callable[[], Target]] = {
    "virtio-blk": BlockTarget,
    "virtio-net": NetTarget,
    "virtio-console": ConsoleTarget,
    "virtio-rng": RngTarget,
}


__all__ = ["FACTORIES", "FakeTap", "RecordingMsi"]
