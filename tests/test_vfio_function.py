"""The assigned PCI function (kvmpy.devices.vfio) over the fake VFIO kernel, on a real PciRoot.

Stepping stones, not the proof: the device underneath is kvmpy.testing.fake_vfio's memfd.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmpy.abi import vfio as abi
from kvmpy.bus import Bus
from kvmpy.devices.pci.root import PciRoot
from kvmpy.devices.vfio import AssignedFunction
from kvmpy.eventfd import EventFd
from kvmpy.testing import fake_vfio
from kvmpy.testing.fake_vfio import FakeVfioKernel, build_host_tree
from kvmpy.vfio import Assignment, assign

BDF = "0000:00:04.0"
BAR0_AT, BAR4_AT = 0xD000_0000, 0xD001_0000
SLOT = 3
CONFIG = abi.VFIO_PCI_CONFIG_REGION_INDEX


class RecordingSender:
    """An irqfd MSI sender: one real eventfd per vector, what was routed and sent."""

    def __init__(self, vectors: int) -> None:
        self.fds = [EventFd() for _ in range(vectors)]
        self.routes: dict[int, tuple[int, int]] = {}
        self.sent: list[int] = []

    def changed(self, vector: int, address: int, data: int) -> None:
        if address:
            self.routes[vector] = (address, data)

    def send(self, vector: int, address: int, data: int) -> None:
        self.sent.append(vector)
        self.fds[vector].signal()

    def irqfd(self, vector: int) -> int | None:
        return self.fds[vector].fd

    def count(self, vector: int) -> int:
        try:
            return os.eventfd_read(self.fds[vector].fd)
        except BlockingIOError:
            return 0


@dataclass
class Rig:
    kernel: FakeVfioKernel
    assignment: Assignment
    function: AssignedFunction
    root: PciRoot
    mmio: Bus
    slots: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    watched: dict[int, Callable[[], None]] = field(default_factory=dict)
    senders: list[RecordingSender] = field(default_factory=list)
    intx: list[tuple[int, int]] = field(default_factory=list)
    intx_unbound: int = 0

    def cfg_read(self, offset: int, size: int = 4) -> int:
        return self.root.config_read(0, SLOT, 0, offset, size)

    def cfg_write(self, offset: int, size: int, value: int) -> None:
        self.root.config_write(0, SLOT, 0, offset, size, value)

    def real_config(self, offset: int, size: int) -> bytes:
        return self.assignment.device.read(CONFIG, offset, size)

    def mmio_write(self, address: int, data: bytes) -> None:
        assert self.mmio.write(address, data)

    def mmio_read(self, address: int, size: int) -> bytes:
        data = bytearray(size)
        assert self.mmio.read(address, memoryview(data))
        return bytes(data)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    paths = build_host_tree(tmp_path, BDF, 5)
    kernel = FakeVfioKernel(paths, BDF, 5)
    assignment = assign(BDF, [(0, 0x10_0000, 0x1000_0000)], kernel=kernel, paths=paths)
    mmio = Bus("mmio")
    root = PciRoot(Bus("pio"), mmio, lambda gpa, size: gpa < 0x10_0000)
    state: dict[str, Rig] = {}
    next_slot = iter(range(100, 200))

    def map_memory(gpa: int, size: int, host: int) -> object:
        number = next(next_slot)
        state["rig"].slots[number] = (gpa, size, host)
        return number

    def unmap_memory(handle: object) -> None:
        del state["rig"].slots[handle]  # type: ignore[arg-type]

    def sender(vectors: int) -> RecordingSender:
        made = RecordingSender(vectors)
        state["rig"].senders.append(made)
        return made

    def bind_intx(trigger: int, resample: int) -> Callable[[], None]:
        state["rig"].intx.append((trigger, resample))

        def unbind() -> None:
            state["rig"].intx_unbound += 1

        return unbind

    rig = Rig(kernel, assignment, None, root, mmio)  # type: ignore[arg-type]
    state["rig"] = rig
    rig.function = AssignedFunction(
        assignment.device,
        lambda bars: {0: BAR0_AT, 4: BAR4_AT},
        sender,
        map_memory,
        unmap_memory,
        lambda fd, handler: rig.watched.__setitem__(fd, handler),
        lambda fd: rig.watched.pop(fd),
        bind_intx,
    )
    root.add(rig.function, slot=SLOT, name="vfio0")
    yield rig
    rig.function.close()
    assignment.close()


def test_identity_comes_from_the_device_and_bars_from_kvmpy(rig: Rig) -> None:
    assert rig.cfg_read(0) == fake_vfio.VENDOR | fake_vfio.DEVICE << 16
    assert rig.cfg_read(0x08) >> 8 == 0x010802  # NVMe class
    assert rig.cfg_read(0x10) == BAR0_AT | 0x4  # 64-bit memory, relocated
    assert rig.cfg_read(0x14) == 0
    assert rig.cfg_read(0x20) == BAR4_AT
    rig.cfg_write(0x10, 4, 0xFFFF_FFFF)  # sizing
    assert rig.cfg_read(0x10) == (~(fake_vfio.BAR0_SIZE - 1) & 0xFFFF_FFF0) | 0x4
    assert rig.cfg_read(0x18) == 0  # the second half of BAR0 is no BAR of its own
    rig.cfg_write(0x30, 4, 0xFFFF_FFFF)
    assert rig.cfg_read(0x30) == 0  # no ROM
    assert rig.real_config(0x10, 4) == struct.pack("<I", 0x4)  # BAR writes stay in kvmpy


def test_capability_chain_keeps_pm_msi_and_msix_and_extended_space_is_empty(rig: Rig) -> None:
    chain, offset = [], rig.cfg_read(0x34, 1)
    while offset:
        chain.append((offset, rig.cfg_read(offset, 1)))
        offset = rig.cfg_read(offset + 1, 1)
    assert chain == [(fake_vfio.PM_CAP, 0x01), (fake_vfio.MSI_CAP, 0x05), (fake_vfio.MSIX_CAP, 0x11)]
    assert rig.cfg_read(fake_vfio.MSIX_CAP + 2, 2) == fake_vfio.MSIX_VECTORS - 1
    assert rig.cfg_read(fake_vfio.MSI_CAP + 2, 2) == 0x0080  # one message, 64-bit, not maskable
    assert rig.cfg_read(0x100) == 0


def test_msi_goes_to_one_irqfd_routed_to_the_guests_message_and_off_brings_intx_back(rig: Rig) -> None:
    """The MSI capability is kvmpy's: the device never sees the guest's message; VFIO gets the
    irqfd of the message's route when the guest enables MSI (INTx off), and INTx is back when
    it disables it (e1000e's IntMode=1 in the SR-IOV lab is the real device)."""
    rig.cfg_write(0x04, 2, 0x0002)
    assert abi.VFIO_PCI_INTX_IRQ_INDEX in rig.kernel.function.irqs
    cap = fake_vfio.MSI_CAP
    rig.cfg_write(cap + 4, 4, 0xFEE0_1000)
    rig.cfg_write(cap + 8, 4, 0)
    rig.cfg_write(cap + 12, 2, 0x4041)
    assert rig.real_config(cap + 4, 4) == bytes(4)  # answered by kvmpy, never forwarded
    msi = rig.senders[-1]
    assert abi.VFIO_PCI_MSI_IRQ_INDEX not in rig.kernel.function.irqs  # not before the enable
    rig.cfg_write(cap + 2, 2, 0x0071)  # enable, and a multiple-message request kvmpy ignores
    assert rig.cfg_read(cap + 2, 2) == 0x0081
    assert msi.routes[0] == (0xFEE0_1000, 0x4041)
    assert rig.kernel.function.irqs[abi.VFIO_PCI_MSI_IRQ_INDEX] == {0: msi.fds[0].fd}
    assert abi.VFIO_PCI_INTX_IRQ_INDEX not in rig.kernel.function.irqs and rig.intx_unbound == 1
    assert rig.kernel.function.fire(abi.VFIO_PCI_MSI_IRQ_INDEX, 0)
    assert msi.count(0) == 1 and msi.sent == []  # straight into KVM, no Python on the way
    rig.cfg_write(cap + 12, 2, 0x4042)  # the guest moves its message while MSI is on
    assert msi.routes[0] == (0xFEE0_1000, 0x4042)
    rig.cfg_write(cap + 2, 2, 0x0000)
    assert abi.VFIO_PCI_MSI_IRQ_INDEX not in rig.kernel.function.irqs
    assert rig.kernel.function.irqs[abi.VFIO_PCI_INTX_IRQ_INDEX] == {0: rig.intx[-1][0]}


def test_capability_bodies_and_status_are_the_device_s(rig: Rig) -> None:
    rig.cfg_write(fake_vfio.PM_CAP + 4, 2, 0x0003)  # PM control: D3hot, goes to the device
    assert rig.real_config(fake_vfio.PM_CAP + 4, 2) == b"\x03\x00"
    rig.assignment.device.write(CONFIG, 0x06, b"\x10\x40")
    assert rig.cfg_read(0x06, 2) == 0x4010
    rig.cfg_write(0x04, 2, 0x0406)  # memory, bus master, INTx disable
    assert rig.real_config(0x04, 2) == b"\x06\x04"
    assert rig.cfg_read(0x04, 2) == 0x0406


def test_mappable_bar_becomes_memory_slots_around_the_msix_pages(rig: Rig) -> None:
    assert rig.slots == {}
    rig.cfg_write(0x04, 2, 0x0002)  # memory decoding on
    assert [(gpa, size) for gpa, size, _ in rig.slots.values()] == [(BAR0_AT, fake_vfio.MSIX_TABLE)]
    (_, _, host), = rig.slots.values()
    ctypes.memmove(host + 0x10, b"guest", 5)  # what the guest's MMIO would reach, without an exit
    assert rig.assignment.device.read(0, 0x10, 5) == b"guest"
    rig.cfg_write(0x04, 2, 0x0000)
    assert rig.slots == {}
    rig.cfg_write(0x04, 2, 0x0002)
    rig.cfg_write(0x10, 4, 0xD010_0000)  # the guest moves the BAR: the slot follows
    assert [gpa for gpa, _, _ in rig.slots.values()] == [0xD010_0000]


def test_unmappable_bar_is_forwarded_with_pread_pwrite(rig: Rig) -> None:
    rig.cfg_write(0x04, 2, 0x0002)
    rig.mmio_write(BAR4_AT + 0x20, struct.pack("<I", 0xCAFE_F00D))
    assert rig.assignment.device.read(4, 0x20, 4) == struct.pack("<I", 0xCAFE_F00D)
    rig.assignment.device.write(4, 0x40, b"\x5a\xa5")
    assert rig.mmio_read(BAR4_AT + 0x40, 2) == b"\x5a\xa5"


def _program(rig: Rig, vector: int, masked: bool) -> None:
    entry = BAR0_AT + fake_vfio.MSIX_TABLE + 16 * vector
    rig.mmio_write(entry, struct.pack("<Q", 0xFEE0_0000 | vector << 12))
    rig.mmio_write(entry + 8, struct.pack("<I", 0x40 + vector))
    rig.mmio_write(entry + 12, struct.pack("<I", 1 if masked else 0))


def test_msix_vectors_go_to_irqfds_and_masked_ones_to_pending(rig: Rig) -> None:
    rig.cfg_write(0x04, 2, 0x0002)
    assert rig.kernel.function.irqs.get(abi.VFIO_PCI_INTX_IRQ_INDEX) == {0: rig.intx[0][0]}
    assert rig.kernel.function.intx_unmask_fd == rig.intx[0][1]
    _program(rig, 0, masked=False)
    _program(rig, 1, masked=True)
    sender = rig.senders[0]
    assert sender.routes[0] == (0xFEE0_0000, 0x40)
    control = fake_vfio.MSIX_CAP + 2
    rig.cfg_write(control, 2, 0x8000)  # MSI-X on
    bound = rig.kernel.function.irqs[abi.VFIO_PCI_MSIX_IRQ_INDEX]
    assert abi.VFIO_PCI_INTX_IRQ_INDEX not in rig.kernel.function.irqs and rig.intx_unbound == 1
    assert bound[0] == sender.fds[0].fd  # straight into KVM
    assert bound[1] != sender.fds[1].fd and bound[1] in rig.watched  # masked: kvmpy watches
    assert rig.kernel.function.fire(abi.VFIO_PCI_MSIX_IRQ_INDEX, 0)
    assert sender.count(0) == 1 and sender.sent == []  # no Python on the way
    assert rig.kernel.function.fire(abi.VFIO_PCI_MSIX_IRQ_INDEX, 1)
    rig.watched[bound[1]]()  # the event loop runs the handler
    assert rig.mmio_read(BAR0_AT + fake_vfio.MSIX_PBA, 8) == struct.pack("<Q", 0b10)
    calls = len(rig.kernel.calls)
    rig.mmio_write(BAR0_AT + fake_vfio.MSIX_TABLE + 16 + 12, struct.pack("<I", 0))  # unmask
    assert sender.sent == [1] and sender.count(1) == 1  # the pending one went out
    assert rig.mmio_read(BAR0_AT + fake_vfio.MSIX_PBA, 8) == bytes(8)
    assert rig.kernel.function.irqs[abi.VFIO_PCI_MSIX_IRQ_INDEX][1] == sender.fds[1].fd
    assert rig.kernel.calls[calls:] == ["VFIO_DEVICE_SET_IRQS"]  # for vector 1 alone:
    assert rig.kernel.irq_sets[-1] == (abi.VFIO_PCI_MSIX_IRQ_INDEX, 1, 1)
    rig.cfg_write(control, 2, 0xC000)  # function mask: every vector to kvmpy's fds
    assert all(fd in rig.watched for fd in rig.kernel.function.irqs[abi.VFIO_PCI_MSIX_IRQ_INDEX].values())
    rig.cfg_write(control, 2, 0x0000)  # MSI-X off: INTx back
    assert abi.VFIO_PCI_MSIX_IRQ_INDEX not in rig.kernel.function.irqs
    assert len(rig.intx) == 2 and rig.kernel.function.irqs[abi.VFIO_PCI_INTX_IRQ_INDEX] == {0: rig.intx[1][0]}


def test_close_drops_slots_interrupts_and_watches_and_release_resets(rig: Rig) -> None:
    rig.cfg_write(0x04, 2, 0x0002)
    rig.cfg_write(fake_vfio.MSIX_CAP + 2, 2, 0x8000)
    assert rig.slots and rig.kernel.function.irqs
    rig.function.close()
    assert rig.slots == {} and rig.watched == {} and rig.kernel.function.irqs == {}
    resets = rig.kernel.function.resets
    rig.assignment.close()
    assert rig.kernel.function.resets == resets + 1


def test_a_looping_or_stray_capability_chain_is_cut() -> None:
    from kvmpy.devices.vfio.config import capability_chain

    config = bytearray(256)
    config[0x06] = 0x10  # capabilities listed
    config[0x34] = 0x40
    config[0x40:0x42] = b"\x01\x50"
    config[0x50:0x52] = b"\x10\x40"  # back to the first: a loop
    assert capability_chain(bytes(config)) == [(0x40, 0x01), (0x50, 0x10)]
    config[0x51] = 0x20  # into the header
    assert capability_chain(bytes(config)) == [(0x40, 0x01), (0x50, 0x10)]
    config[0x06] = 0
    assert capability_chain(bytes(config)) == []


def test_bar_kinds_from_the_registers_and_sizes_from_vfio() -> None:
    from kvmpy.devices.pci.config_space import BarKind
    from kvmpy.devices.vfio.config import bar_layout

    config = bytearray(256)
    struct.pack_into("<IIIIII", config, 0x10, 0xC, 0, 0x1, 0x0, 0x4, 0)  # mem64 pf, -, io, mem32, mem64
    bars = bar_layout(bytes(config), [0x4000, 0, 0x100, 0, 0x1000, 0])
    assert [(b.index, b.kind, b.prefetchable) for b in bars if b] == [
        (0, BarKind.MEM64, True),
        (2, BarKind.IO, False),
        (4, BarKind.MEM64, False),
    ]
