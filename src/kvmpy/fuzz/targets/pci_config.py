"""PCI configuration space through both mechanisms (ports 0xCF8/0xCFC and ECAM), with BAR and
MSI-X capability writes of every size at every offset.

Bus 0 holds the host bridge, a virtio-rng function (two memory BARs, vendor capabilities,
MSI-X) and a test function with an I/O BAR and a prefetchable 64-bit memory BAR. An input
is a list of operations::

    mechanism  u8    0 ports 0xCF8-0xCFF, 1 ECAM (bus 0 and beyond)
    kind       u8    bit 0: write
    offset     u32   a port offset (0-7), or an ECAM offset (bus, device, function, register)
    size       u8    1, 2, 4 or 8
    value      size bytes, writes only
"""

from __future__ import annotations

from kvmpy.bus import Bus
from kvmpy.devices.legacy.port_sinks import QuietPorts
from kvmpy.devices.pci import config_space as cs
from kvmpy.devices.pci.config_space import Bar, BarKind, PciConfigSpace
from kvmpy.devices.pci.host_bridge import HostBridge
from kvmpy.devices.pci.root import ConfigMechanism1, Ecam, PciFunction, PciRoot
from kvmpy.fuzz.guarded_memory import GuardedMemory
from kvmpy.fuzz.harness import KnownIssue, Reader, Writer, check
from kvmpy.fuzz.targets.virtio_devices import RecordingMsi
from kvmpy.virtio.devices.rng import VirtioRng
from kvmpy.virtio.pci_transport import VirtioPciTransport

#: Low RAM ends off a 16 KiB boundary, so a naturally aligned BAR can straddle its end.
RAM = [(0, 0xFF000), (0x1_0000_0000, 0x10000)]
SIZES = (1, 2, 4, 8)
MAX_OPERATIONS = 256
#: Identity registers no guest write may change: (offset, size).
READ_ONLY = ((cs.VENDOR_ID, 2), (cs.DEVICE_ID, 2), (cs.REVISION, 1), (cs.CLASS_CODE, 3),
             (cs.HEADER_TYPE, 1), (cs.SUBSYSTEM_VENDOR_ID, 2), (cs.SUBSYSTEM_ID, 2),
             (cs.CAPABILITIES_POINTER, 1), (cs.INTERRUPT_PIN, 1))  # fmt: skip


class TestFunction:
    """A function with the BAR kinds virtio's transport does not use: I/O and 64-bit memory."""

    def __init__(self) -> None:
        self.config = PciConfigSpace(vendor_id=0x1B36, device_id=0x0005, class_code=0xFF0000)
        self.config.add_bar(Bar(0, 0x20, BarKind.IO), 0xC000)
        self.config.add_bar(Bar(2, 0x4000, BarKind.MEM64, prefetchable=True), 0x8_0000_0000)
        self.config.add_capability(0x09, bytes(6), writable=bytes([0xFF] * 6))
        self.mapped: dict[int, int | None] = {}

    def bar_device(self, index: int) -> QuietPorts | None:
        return QuietPorts() if index in (0, 2) else None

    def bar_mapped(self, index: int, address: int | None) -> None:
        self.mapped[index] = address

    def config_written(self, offset: int, size: int) -> None:
        pass


class PciConfigTarget:
    name = "pci-config"
    max_len = 2048
    invariants = (
        "no configuration access raises, whatever the mechanism, offset and size; reads fill "
        "exactly their buffer",
        "identity registers (vendor, device, revision, class, header type, subsystem, capability "
        "pointer, interrupt pin) and the capability list never change",
        "every BAR address is aligned to its size",
        "a BAR is on a bus exactly where its register says, only while decoding is enabled, "
        "never over guest RAM, and the buses agree with the root",
        "the MSI-X capability's table size and BIR never change",
        "guest RAM and its guard pages are untouched",
    )
    known: tuple[KnownIssue, ...] = ()

    def __init__(self) -> None:
        self.mem = GuardedMemory(RAM)
        self._zeros = [bytes(size) for _, size in RAM]

    def run(self, data: bytes) -> None:
        pio, mmio = Bus("pio"), Bus("mmio")
        root = PciRoot(pio, mmio, self.mem.is_ram)
        rng = VirtioPciTransport(
            VirtioRng(), self.mem, RecordingMsi(), 0xC000_0000, 0xC000_4000, lambda _a: None
        )
        functions: list[PciFunction] = [HostBridge(), rng, TestFunction()]
        for slot, function in enumerate(functions):
            root.add(function, slot, f"f{slot}")
        identity = [self._identity(f.config) for f in functions]
        msix_before = rng.config.raw(rng.msix.cap_offset, 2) + rng.config.raw(rng.msix.cap_offset + 4, 8)
        ports, ecam = ConfigMechanism1(root), Ecam(root)
        reader = Reader(data)
        for _ in range(MAX_OPERATIONS):
            if not reader.remaining:
                break
            mechanism, kind, offset, size = (
                reader.u8() & 1,
                reader.u8() & 1,
                reader.u32(),
                SIZES[reader.u8() % 4],
            )
            device, span = (ports, 8) if mechanism == 0 else (ecam, 2 << 20)
            offset %= span
            if offset + size > span:
                continue
            if kind:
                device.write(offset, reader.uint(size).to_bytes(size, "little"))
            else:
                buffer = bytearray(b"\x5c" * (size + 2))
                device.read(offset, memoryview(buffer)[1 : 1 + size])
                check(
                    buffer[0] == 0x5C and buffer[-1] == 0x5C, f"config read of {size} at {offset:#x} overran"
                )
        for function, before in zip(functions, identity, strict=True):
            check(self._identity(function.config) == before, "a read-only configuration register changed")
            self._check_bars(root, function, pio, mmio)
        msix_after = rng.config.raw(rng.msix.cap_offset, 2) + rng.config.raw(rng.msix.cap_offset + 4, 8)
        check(msix_after == msix_before, "the MSI-X capability's ID, table size or BIR changed")
        self.mem.check_canaries()
        untouched = all(
            bytes(region.view) == zeros for region, zeros in zip(self.mem.regions, self._zeros, strict=True)
        )
        check(untouched, "guest RAM was written")

    @staticmethod
    def _identity(config: PciConfigSpace) -> tuple[bytes, list[tuple[int, int]]]:
        registers = b"".join(config.raw(offset, size) for offset, size in READ_ONLY)
        chain: list[tuple[int, int]] = []
        at = config.raw(cs.CAPABILITIES_POINTER, 1)[0]
        while at and len(chain) < 64:
            chain.append((at, config.raw(at, 1)[0]))
            at = config.raw(at + 1, 1)[0]
        check(len(chain) < 64, "the capability list loops")
        return registers, chain

    def _check_bars(self, root: PciRoot, function: PciFunction, pio: Bus, mmio: Bus) -> None:
        config, root_ram = function.config, self.mem.regions
        slot = root.slots.index(function)
        for index, bar in enumerate(config.bars):
            if bar is None:
                continue
            address = config.bar_address(index)
            check(address % bar.size == 0, f"BAR{index} at {address:#x} is not aligned to {bar.size:#x}")
            mapped = root._mapped.get((slot, index))
            if mapped is None:
                continue
            check(config.bar_enabled(index), f"BAR{index} is mapped while decoding is off")
            check(mapped.base == address and mapped.size == bar.size, f"BAR{index} is mapped elsewhere")
            over_ram = any(address < r.end and r.gpa < address + bar.size for r in root_ram)
            check(bar.is_io or not over_ram, f"BAR{index} at {address:#x} is mapped over RAM")
            bus = pio if bar.is_io else mmio
            check(bus.find(mapped.base, mapped.size) is mapped, f"the bus lost BAR{index}")

    def _msix_control(self) -> int:
        """The MSI-X message control register's offset in the virtio function's configuration space."""
        rng = VirtioPciTransport(
            VirtioRng(), self.mem, RecordingMsi(), 0xC000_0000, 0xC000_4000, lambda _a: None
        )
        return rng.msix.cap_offset + 2

    def seeds(self) -> list[bytes]:
        def port_config(slot: int, register: int, size: int, value: int | None) -> bytes:
            address = 0x8000_0000 | slot << 11 | register & 0xFC
            out = Writer().u8(0).u8(1).u32(0).u8(2).u32(address)
            out.u8(0).u8(0 if value is None else 1).u32(4 + (register & 3)).u8(SIZES.index(size))
            if value is not None:
                out.uint(size, value)
            return out.bytes()

        def ecam(slot: int, register: int, size: int, value: int | None) -> bytes:
            out = (
                Writer().u8(1).u8(0 if value is None else 1).u32(slot << 15 | register).u8(SIZES.index(size))
            )
            if value is not None:
                out.uint(size, value)
            return out.bytes()

        # Linux's enumeration: identity, header, BAR sizing (all ones, read back, restore),
        # the capability list, MSI-X enable and function mask, memory decoding on.
        seeds = []
        for access in (port_config, ecam):
            probe = b"".join(access(slot, 0, 4, None) + access(slot, 8, 4, None) for slot in range(4))
            sizing = b""
            for slot, bar in ((1, 0x10), (2, 0x10), (2, 0x18), (2, 0x1C)):
                sizing += access(slot, bar, 4, 0xFFFF_FFFF) + access(slot, bar, 4, None)
            sizing += access(2, 0x10, 4, 0xD000) + access(2, 0x18, 4, 0xE000_0000) + access(2, 0x1C, 4, 0)
            caps = access(1, 0x34, 1, None) + access(1, 0x40, 2, None) + access(1, 0x41, 1, None)
            enable = access(1, 0x04, 2, 0x0007) + access(2, 0x04, 2, 0x0003)
            msix = b"".join(access(1, offset, 2, None) for offset in range(0x40, 0x80, 4))
            control = self._msix_control()
            msix += access(1, control, 2, 0xC000) + access(1, control, 2, 0x8000)
            # A BAR moved to straddle the end of low RAM, and one moved onto RAM.
            sizing += access(1, 0x10, 4, 0xFC000) + access(1, 0x14, 4, 0x80000)
            seeds += [probe, probe + sizing + enable, caps + msix, probe + sizing + caps + enable + msix]
        return seeds


FACTORIES = {"pci-config": PciConfigTarget}

__all__ = ["FACTORIES", "PciConfigTarget", "TestFunction"]
