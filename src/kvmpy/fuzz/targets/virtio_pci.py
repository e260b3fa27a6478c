"""The virtio-pci transport's registers: common configuration, ISR, device configuration,
notify, the MSI-X table and PBA, and the function's configuration space.

The device behind the transport is chosen by the first byte (rng, blk, console or net, so
every device configuration layout is read). Then a list of operations::

    area    u8    0 BAR 0 (common, ISR, device, notify), 1 MSI-X BAR, 2 configuration space
    kind    u8    bit 0: write
    offset  u16   modulo the area's size
    size    u8    1, 2, 4 or 8 (1, 2, 4 for configuration space)
    value   size bytes, writes only
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kvmpy.devices.pci.msix import BAR_SIZE as MSIX_SIZE
from kvmpy.fuzz.guarded_memory import GuardedMemory
from kvmpy.fuzz.harness import KnownIssue, Reader, Writer, check
from kvmpy.fuzz.targets.virtio_devices import FakeTap, RecordingMsi
from kvmpy.virtio import pci_transport as pt
from kvmpy.virtio.device import F_VERSION_1, VirtioDevice
from kvmpy.virtio.devices.blk import VirtioBlock
from kvmpy.virtio.devices.console import VirtioConsole
from kvmpy.virtio.devices.net import VirtioNet
from kvmpy.virtio.devices.rng import VirtioRng
from kvmpy.virtio.pci_transport import VirtioPciTransport

RAM = [(0, 0x20000)]
SIZES = (1, 2, 4, 8)
MAX_OPERATIONS = 256
#: (offset, width) of every common configuration register (virtio 1.x, 4.1.4.3): the device's,
#: then the selected queue's.
DEVICE_REGISTERS = ((0, 4), (4, 4), (8, 4), (12, 4), (16, 2), (18, 2), (20, 1), (21, 1))
QUEUE_REGISTERS = ((22, 2), (24, 2), (26, 2), (28, 2), (30, 2), (32, 8), (40, 8), (48, 8))
COMMON_REGISTERS = DEVICE_REGISTERS + QUEUE_REGISTERS


class MsiLog(RecordingMsi):
    """Remembers the vectors messages were sent for."""

    def __init__(self) -> None:
        super().__init__()
        self.vectors: list[int] = []

    def send(self, vector: int, address: int, data: int) -> None:
        super().send(vector, address, data)
        self.vectors.append(vector)


class VirtioPciTarget:
    name = "virtio-pci"
    max_len = 2048
    invariants = (
        "no register access raises; reads fill exactly their buffer",
        "FEATURES_OK stays set only for features the device offered, VERSION_1 among them",
        "DRIVER_OK starts the device only after FEATURES_OK",
        "a queue is ready only with a valid size and rings inside guest RAM",
        "MSI-X messages go only to vectors the table has",
        "writing 0 to the status resets every common register to what a fresh transport reads",
        "guest RAM and its guard pages are untouched (no queue can be used without DRIVER_OK rings)",
    )
    known: tuple[KnownIssue, ...] = ()

    def __init__(self) -> None:
        self.mem = GuardedMemory(RAM)
        self._zeros = bytes(RAM[0][1])
        # Under TMPDIR, which the runner gives each engine and removes after it.
        self.directory = Path(tempfile.mkdtemp(prefix="kvmpy-fuzz-pci-"))
        self.image = self.directory / "disk.img"
        self.image.write_bytes(bytes(4096))
        self._fresh_dumps: dict[int, bytes] = {}

    def _device(self, kind: int) -> tuple[VirtioDevice, object]:
        """A device of ``kind`` and the host resource to close afterwards (or None)."""
        if kind == 1:
            disk = VirtioBlock(self.image, device_id="fuzz")
            return disk, disk
        if kind == 2:
            return VirtioConsole(lambda _data: None), None
        if kind == 3:
            tap = FakeTap()
            return VirtioNet(tap, bytes(6), lambda _fd, _h: None, lambda _fd: None), tap  # type: ignore[arg-type]
        return VirtioRng(), None

    def _transport(self, device: VirtioDevice, msi: RecordingMsi) -> VirtioPciTransport:
        transport = VirtioPciTransport(
            device, self.mem, msi, 0xC000_0000, 0xC000_4000, lambda _a: None, self._intx
        )
        transport.bar_mapped(0, 0xC000_0000)
        return transport

    def _intx(self, level: bool) -> None:
        pass

    def run(self, data: bytes) -> None:
        self.mem.clear()
        reader = Reader(data)
        kind = reader.u8() % 4
        device, resource = self._device(kind)
        self.activations = 0
        activate = device.activate

        def counting_activate(*args: object) -> None:
            self.activations += 1
            check(
                bool(transport.status & pt.STATUS_FEATURES_OK),
                "DRIVER_OK started the device without FEATURES_OK",
            )
            activate(*args)  # type: ignore[arg-type]

        device.activate = counting_activate  # type: ignore[method-assign,assignment]
        msi = MsiLog()
        transport = self._transport(device, msi)
        bar0, msix = transport.bar_device(0), transport.msix
        assert bar0 is not None
        try:
            for _ in range(MAX_OPERATIONS):
                if not reader.remaining:
                    break
                area, write, offset = reader.u8() % 3, reader.u8() & 1, reader.u16()
                size = SIZES[reader.u8() % (4 if area < 2 else 3)]
                span = (pt.BAR0_SIZE, MSIX_SIZE, 0x100)[area]
                offset %= span
                if offset + size > span:
                    continue
                value = reader.uint(size) if write else 0
                if area == 2:
                    if write:
                        transport.config.write(offset, size, value)
                        transport.config_written(offset, size)
                    else:
                        transport.config.read(offset, size)
                    continue
                target = bar0 if area == 0 else msix
                if write:
                    target.write(offset, value.to_bytes(size, "little"))
                else:
                    buffer = bytearray(b"\x5c" * (size + 2))
                    target.read(offset, memoryview(buffer)[1 : 1 + size])
                    check(buffer[0] == 0x5C and buffer[-1] == 0x5C, f"read of {size} at {offset:#x} overran")
                self._check(transport)
            check(
                all(v < msix.vectors for v in msi.vectors), f"MSI-X message to a vector past {msix.vectors}"
            )
            bar0.write(pt.COMMON_OFFSET + 20, b"\0")
            check(self._dump(transport) == self._fresh_dump(kind), "status 0 left common registers changed")
            self.mem.check_canaries()
            check(bytes(self.mem.regions[0].view) == self._zeros, "guest RAM was written")
        finally:
            if resource is not None:
                resource.close()  # type: ignore[attr-defined]

    def _check(self, transport: VirtioPciTransport) -> None:
        if transport.status & pt.STATUS_FEATURES_OK:
            offered = transport.device.features
            accepted = transport.driver_features
            check(not accepted & ~offered and bool(accepted & F_VERSION_1),
                  f"FEATURES_OK kept for features {accepted:#x} of {offered:#x} offered")  # fmt: skip
        for queue in transport.queues:
            if queue.ready:
                size_ok = 0 < queue.size <= queue.max_size and not queue.size & (queue.size - 1)
                check(size_ok, f"a ready queue of size {queue.size}")
                rings = ((queue.desc_addr, 16 * queue.size), (queue.driver_addr, 6 + 2 * queue.size),
                         (queue.device_addr, 6 + 8 * queue.size))  # fmt: skip
                for at, length in rings:
                    check(self.mem.is_ram(at, length), f"a ready queue's ring at {at:#x} is not RAM")

    @staticmethod
    def _dump(transport: VirtioPciTransport) -> bytes:
        """Every common register: the device's once, the queue's with each queue selected in
        turn (and one past the last); the device's again with the last selection, so one that
        followed queue_select would show."""
        out = bytearray()
        for select in range(len(transport.queues) + 1):
            transport.write_common(22, 2, select)
            for offset, size in QUEUE_REGISTERS if select else COMMON_REGISTERS:
                out += transport.read_common(offset, size).to_bytes(size, "little")
        for offset, size in DEVICE_REGISTERS:
            out += transport.read_common(offset, size).to_bytes(size, "little")
        transport.write_common(22, 2, 0)
        return bytes(out)

    def _fresh_dump(self, kind: int) -> bytes:
        if kind not in self._fresh_dumps:
            device, resource = self._device(kind)
            self._fresh_dumps[kind] = self._dump(self._transport(device, RecordingMsi()))
            if resource is not None:
                resource.close()  # type: ignore[attr-defined]
        return self._fresh_dumps[kind]

    def seeds(self) -> list[bytes]:
        def op(area: int, offset: int, size: int, value: int | None = None) -> bytes:
            out = Writer().u8(area).u8(0 if value is None else 1).u16(offset).u8(SIZES.index(size))
            if value is not None:
                out.uint(size, value)
            return out.bytes()

        # Linux's virtio_pci_modern probe: reset, features, queues, MSI-X vectors, DRIVER_OK;
        # then a device configuration read at each width, and an ISR read.
        probe = op(0, 20, 1, 0) + op(0, 20, 1, 1) + op(0, 20, 1, 3)
        probe += op(0, 0, 4, 0) + op(0, 4, 4) + op(0, 0, 4, 1) + op(0, 4, 4)
        probe += op(0, 8, 4, 0) + op(0, 12, 4, 0x3000_0000) + op(0, 8, 4, 1) + op(0, 12, 4, 1)
        probe += op(0, 20, 1, 0x0B) + op(0, 20, 1)
        msix = op(2, 0x04, 2, 0x06) + op(1, 0, 4, 0xFEE0_0000) + op(1, 8, 4, 0x41) + op(1, 12, 4, 0)
        queue = op(0, 22, 2, 0) + op(0, 24, 2) + op(0, 24, 2, 16) + op(0, 26, 2, 0)
        queue += op(0, 32, 8, 0x1000) + op(0, 40, 8, 0x2000) + op(0, 48, 8, 0x3000) + op(0, 28, 2, 1)
        config = b"".join(op(0, 0x2000 + at, size) for at, size in ((0, 8), (8, 4), (12, 4), (20, 4), (0, 1)))
        driver_ok = op(0, 20, 1, 0x0F) + op(0, 16, 2, 1) + op(0, 0x1000, 1) + op(0, 0x3000, 2, 0)
        full = probe + msix + queue + config + driver_ok
        return [bytes([kind]) + part for kind in range(4) for part in (probe, full)]


FACTORIES = {"virtio-pci": VirtioPciTarget}

__all__ = ["FACTORIES", "VirtioPciTarget"]
