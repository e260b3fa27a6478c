"""PCI configuration access, BAR sizing and placement, MSI-X, and the virtio-pci transport."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.bus import Bus
from kvmpy.devices.pci.config_space import COMMAND_MEMORY
from kvmpy.devices.pci.host_bridge import HostBridge
from kvmpy.devices.pci.root import ConfigMechanism1, Ecam, PciRoot
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio import pci_transport as vp
from kvmpy.virtio.device import F_VERSION_1
from kvmpy.virtio.devices.rng import VirtioRng

RAM = 1 << 24
BAR0 = 0xC001_0000


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[tuple[int, int, int]] = []

    def send(self, vector: int, address: int, data: int) -> None:
        self.sent.append((vector, address, data))

    def changed(self, vector: int, address: int, data: int) -> None:
        pass


class Platform:
    def __init__(self) -> None:
        self.intx: list[bool] = []
        self.mem = GuestMemory.anonymous([(0, RAM)])
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.root = PciRoot(self.pio, self.mmio, self.mem.is_ram)
        self.cf8 = ConfigMechanism1(self.root)
        self.root.add(HostBridge(), slot=0)
        self.sender = RecordingSender()
        self.notify_areas: list[list[tuple[int, int, int]]] = []
        self.transport = vp.VirtioPciTransport(
            VirtioRng(),
            self.mem,
            self.sender,
            BAR0,
            BAR0 + vp.BAR0_SIZE,
            self.notify_areas.append,
            intx=self.intx.append,
            interrupt_line=17,
        )
        self.root.add(self.transport, slot=1, name="rng")

    def cfg_read(self, slot: int, offset: int, size: int = 4) -> int:
        self.cf8.write(0, struct.pack("<I", 0x8000_0000 | slot << 11 | (offset & 0xFC)))
        data = bytearray(size)
        self.cf8.read(4 + (offset & 3), memoryview(data))
        return int.from_bytes(data, "little")

    def cfg_write(self, slot: int, offset: int, value: int, size: int = 4) -> None:
        self.cf8.write(0, struct.pack("<I", 0x8000_0000 | slot << 11 | (offset & 0xFC)))
        self.cf8.write(4 + (offset & 3), value.to_bytes(size, "little"))

    def bar0_read(self, offset: int, size: int) -> int:
        data = bytearray(size)
        assert self.mmio.read(BAR0 + offset, memoryview(data))
        return int.from_bytes(data, "little")

    def bar0_write(self, offset: int, value: int, size: int) -> None:
        assert self.mmio.write(BAR0 + offset, value.to_bytes(size, "little"))


@pytest.fixture
def platform() -> Platform:
    return Platform()


def test_enumeration(platform: Platform) -> None:
    assert platform.cfg_read(0, 0) == 0x0008_1B36
    assert platform.cfg_read(1, 0) == 0x1044_1AF4  # virtio vendor, modern rng
    assert platform.cfg_read(5, 0) == 0xFFFF_FFFF  # empty slot
    ecam = Ecam(platform.root)
    data = bytearray(4)
    ecam.read(1 << 15, memoryview(data))
    assert int.from_bytes(data, "little") == 0x1044_1AF4


def test_capability_list_has_the_virtio_structures(platform: Platform) -> None:
    pointer = platform.cfg_read(1, 0x34, 1)
    kinds = []
    while pointer:
        cap_id = platform.cfg_read(1, pointer, 1)
        kinds.append((cap_id, platform.cfg_read(1, pointer + 3, 1) if cap_id == 9 else None))
        pointer = platform.cfg_read(1, pointer + 1, 1)
    assert kinds == [(9, 1), (9, 3), (9, 4), (9, 2), (0x11, None)]


def test_bar_sizing_and_moving(platform: Platform) -> None:
    assert platform.mmio.find(BAR0) is None  # memory decoding is off until the guest enables it
    platform.cfg_write(1, 0x04, COMMAND_MEMORY, 2)
    assert platform.mmio.find(BAR0) is not None
    assert platform.notify_areas[-1][0] == (BAR0 + vp.NOTIFY_OFFSET, 2, 0)
    platform.cfg_write(1, 0x10, 0xFFFF_FFFF)
    assert platform.cfg_read(1, 0x10) == (~(vp.BAR0_SIZE - 1)) & 0xFFFF_FFFF
    assert platform.mmio.find(BAR0) is None  # unmapped while sizing
    platform.cfg_write(1, 0x10, 0xC800_0000)
    assert platform.mmio.find(0xC800_0000) is not None
    assert platform.notify_areas[-1][0][0] == 0xC800_0000 + vp.NOTIFY_OFFSET


def test_bar_over_ram_or_another_device_is_refused(platform: Platform) -> None:
    platform.cfg_write(1, 0x04, COMMAND_MEMORY, 2)
    platform.cfg_write(1, 0x10, 0x0010_0000)  # guest RAM
    assert platform.mmio.find(0x0010_0000) is None
    platform.cfg_write(1, 0x10, BAR0 + vp.BAR0_SIZE)  # on top of its own MSI-X BAR
    assert platform.mmio.find(BAR0 + vp.BAR0_SIZE).name.endswith("BAR1")  # type: ignore[union-attr]
    assert platform.root.refused_bars == 2


def negotiate(platform: Platform, features: int) -> int:
    platform.cfg_write(1, 0x04, COMMAND_MEMORY, 2)
    platform.bar0_write(20, vp.STATUS_ACKNOWLEDGE | vp.STATUS_DRIVER, 1)
    for select in (0, 1):
        platform.bar0_write(8, select, 4)
        platform.bar0_write(12, (features >> (32 * select)) & 0xFFFF_FFFF, 4)
    platform.bar0_write(20, vp.STATUS_ACKNOWLEDGE | vp.STATUS_DRIVER | vp.STATUS_FEATURES_OK, 1)
    return platform.bar0_read(20, 1)


def test_feature_negotiation(platform: Platform) -> None:
    platform.cfg_write(1, 0x04, COMMAND_MEMORY, 2)
    platform.bar0_write(0, 1, 4)
    assert platform.bar0_read(4, 4) & 1  # VERSION_1 is bit 32
    assert negotiate(platform, F_VERSION_1) & vp.STATUS_FEATURES_OK


def test_unoffered_features_are_refused() -> None:
    platform = Platform()
    assert not negotiate(platform, F_VERSION_1 | (1 << 50)) & vp.STATUS_FEATURES_OK
    platform = Platform()
    assert not negotiate(platform, 0) & vp.STATUS_FEATURES_OK  # legacy drivers are not served


def test_bad_ring_address_needs_reset(platform: Platform) -> None:
    negotiate(platform, F_VERSION_1)
    platform.bar0_write(22, 0, 2)  # queue_select
    platform.bar0_write(32, RAM + 0x1000, 8)  # descriptors outside RAM
    platform.bar0_write(28, 1, 2)  # queue_enable
    assert platform.bar0_read(20, 1) & vp.STATUS_NEEDS_RESET
    assert platform.bar0_read(28, 2) == 0
    platform.bar0_write(20, 0, 1)  # reset recovers
    assert platform.bar0_read(20, 1) == 0


def test_msix_delivery_and_masking(platform: Platform) -> None:
    platform.cfg_write(1, 0x04, COMMAND_MEMORY, 2)
    msix = platform.transport.msix
    table = BAR0 + vp.BAR0_SIZE
    entry = struct.pack("<QII", 0xFEE0_0000, 0x41, 1)  # vector 1, masked
    for word in range(4):  # drivers write the table a dword at a time
        platform.mmio.write(table + 16 + 4 * word, entry[4 * word : 4 * word + 4])
    platform.transport.queue_vectors[0] = 1
    control = msix.cap_offset + 2
    platform.cfg_write(1, control, 1 << 15, 2)  # MSI-X enable
    platform.transport.interrupt(0)
    assert platform.sender.sent == []  # masked: pending
    platform.mmio.write(table + 16 + 12, struct.pack("<I", 0))  # unmask
    assert platform.sender.sent == [(1, 0xFEE0_0000, 0x41)]


def test_intx_follows_the_isr_while_msix_is_off(platform: Platform) -> None:
    assert platform.cfg_read(1, 0x3C, 2) == 0x0111  # INTA#, line 17
    platform.cfg_write(1, 0x04, COMMAND_MEMORY, 2)
    platform.transport.interrupt(0)
    platform.transport.interrupt(0)
    assert platform.intx == [True]  # level-triggered: raised once, held
    assert platform.bar0_read(vp.ISR_OFFSET, 1) == 1
    assert platform.intx == [True, False]  # the ISR read acknowledged it
    assert platform.bar0_read(vp.ISR_OFFSET, 1) == 0
    platform.transport.fail("test")  # configuration change: ISR bit 1, INTx again
    assert platform.intx == [True, False, True]
    platform.cfg_write(1, 0x04, COMMAND_MEMORY | 1 << 10, 2)  # Interrupt Disable
    assert platform.intx == [True, False, True, False]


def test_no_intx_once_msix_is_enabled(platform: Platform) -> None:
    platform.cfg_write(1, 0x04, COMMAND_MEMORY, 2)
    platform.cfg_write(1, platform.transport.msix.cap_offset + 2, 1 << 15, 2)
    platform.transport.interrupt(0)
    assert platform.intx == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 0x4000), st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1)),
        max_size=60,
    )
)
def test_hostile_register_writes(writes: list[tuple[int, int, int]]) -> None:
    platform = Platform()
    platform.cfg_write(1, 0x04, COMMAND_MEMORY, 2)
    for offset, size, value in writes:
        platform.mmio.write(BAR0 + offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        platform.mmio.read(BAR0 + offset, memoryview(bytearray(size)))
        platform.cfg_write(1, offset & 0xFF, value & 0xFFFF_FFFF)


def test_an_interrupt_racing_a_table_write_never_routes_the_old_message_last() -> None:
    """The event loop signals a vector while a vCPU moves it (Linux masks, rewrites, unmasks
    it on an affinity change). The message read before the move used to be routed after the
    new one, leaving KVM's route on the old destination."""
    import threading
    import time

    from kvmpy.devices.pci.config_space import PciConfigSpace
    from kvmpy.devices.pci.msix import MsixTable

    class SlowSender:
        def __init__(self) -> None:
            self.routed: list[int] = []
            self.sending, self.release = threading.Event(), threading.Event()

        def send(self, vector: int, address: int, data: int) -> None:
            self.sending.set()
            self.release.wait(5)
            self.routed.append(data)  # send routes the message it was given, then signals

        def changed(self, vector: int, address: int, data: int) -> None:
            self.routed.append(data)

    config = PciConfigSpace(vendor_id=1, device_id=2, class_code=0, revision=0)
    sender = SlowSender()
    msix = MsixTable(config, 2, bar=1, sender=sender)
    entry = struct.pack("<QII", 0xFEE0_0000, 0x41, 0)  # vector 0: message 0x41, unmasked
    for word in range(4):
        msix.write(4 * word, entry[4 * word : 4 * word + 4])
    config.write(msix.cap_offset + 2, 2, 1 << 15)  # MSI-X enable
    sender.routed.clear()
    signaller = threading.Thread(target=msix.signal, args=(0,))
    signaller.start()
    assert sender.sending.wait(5)
    mover = threading.Thread(target=msix.write, args=(8, struct.pack("<I", 0x52)))  # new data word
    mover.start()
    time.sleep(0.05)
    sender.release.set()
    signaller.join(5)
    mover.join(5)
    assert sender.routed[-1] == 0x52


def test_an_irqfd_is_handed_out_only_while_its_vector_is_deliverable() -> None:
    """A back end outside Python (vhost) gets a vector's irqfd only while nothing masks it, and
    hears when that changes: a masked vector's interrupts go through Python, which keeps them
    pending, as for kvmpy's own devices."""
    from kvmpy.devices.pci.config_space import PciConfigSpace
    from kvmpy.devices.pci.msix import MsixTable

    class IrqfdSender(RecordingSender):
        def irqfd(self, vector: int) -> int:
            return 100 + vector

    config = PciConfigSpace(vendor_id=1, device_id=2, class_code=0, revision=0)
    msix = MsixTable(config, 2, bar=1, sender=IrqfdSender())
    changes: list[int | None] = []
    msix.on_mask_change = lambda: changes.append(msix.irqfd(1))
    entry = struct.pack("<QII", 0xFEE0_0000, 0x41, 0)  # vector 1, unmasked
    for word in range(4):
        msix.write(16 + 4 * word, entry[4 * word : 4 * word + 4])
    assert msix.irqfd(1) is None and changes == []  # MSI-X is still off
    before = msix.snapshot_masks()
    config.write(msix.cap_offset + 2, 2, 1 << 15)  # MSI-X enable
    msix.config_written(before)
    assert changes == [101]
    msix.write(16 + 12, struct.pack("<I", 1))  # the driver masks vector 1
    assert changes == [101, None] and msix.irqfd(1) is None
    msix.write(16 + 12, struct.pack("<I", 0))
    assert changes[-1] == 101
    msix.write(16 + 8, struct.pack("<I", 0x42))  # a new message, still unmasked: nothing to say
    assert len(changes) == 3
