"""Virtio devices saved and restored without KVM: work continues, hostile state is refused in one line."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmpy.abi import tun
from kvmpy.devices.pci.config_space import PciConfigState
from kvmpy.devices.pci.msix import NO_VECTOR, MsixState
from kvmpy.errors import RestoreError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.state.errors import StateError
from kvmpy.state.machine_state import (
    MachineDescription,
    PciSlot,
    RegionState,
    VirtioDeviceState,
    config_for_restore,
    read_description,
)
from kvmpy.state.snapshot_file import Section, decode, encode
from kvmpy.testing.fakes import SocketTap
from kvmpy.testing.virtio_driver import Buffer, MockDriver, TransportDriver
from kvmpy.virtio import pci_transport as vp
from kvmpy.virtio.device import F_EVENT_IDX, F_VERSION_1
from kvmpy.virtio.devices import blk, net
from kvmpy.virtio.devices.blk import VirtioBlock
from kvmpy.virtio.devices.console import PENDING_LIMIT, ConsoleState, VirtioConsole
from kvmpy.virtio.devices.net import VirtioNet
from kvmpy.virtio.queue import QueueState
from kvmpy.vmm.config import NetConfig

RAM = 1 << 24
BAR0 = 0xC001_0000
RING = 0x10000
HEADER, DATA, STATUS = 0x40000, 0x80000, 0x3F000


class Sender:
    """An MsiSender that records what it was asked to route and send."""

    def __init__(self) -> None:
        self.sent: list[int] = []
        self.routed: dict[int, tuple[int, int]] = {}

    def send(self, vector: int, address: int, data: int) -> None:
        self.sent.append(vector)

    def changed(self, vector: int, address: int, data: int) -> None:
        self.routed[vector] = (address, data)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory.anonymous([(0, RAM)])
    yield memory
    memory.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * 256)  # 128 sectors
    return path


def transport_for(
    device: Any, mem: GuestMemory, sender: Sender | None = None, intx: Callable[[bool], None] | None = None
) -> vp.VirtioPciTransport:
    bar1 = BAR0 + vp.BAR0_SIZE
    return vp.VirtioPciTransport(device, mem, sender or Sender(), BAR0, bar1, lambda a: None, intx)


def _read_request(mem: GuestMemory, driver: MockDriver, sector: int) -> int:
    mem.write(HEADER, struct.pack("<IIQ", blk.T_IN, 0, sector))
    buffers = [Buffer(HEADER, 16), Buffer(DATA, 512, writable=True), Buffer(STATUS, 1, writable=True)]
    return driver.add(buffers)


def _close(transport: vp.VirtioPciTransport) -> None:
    device: Any = transport.device
    device.close()


def _live_disk(
    mem: GuestMemory, image: Path, intx: Callable[[bool], None] | None = None
) -> tuple[vp.VirtioPciTransport, TransportDriver, MockDriver]:
    transport = transport_for(VirtioBlock(image), mem, intx=intx)
    pci = TransportDriver(transport, mem)
    pci.negotiate(F_VERSION_1 | F_EVENT_IDX)
    driver = pci.setup_queue(0, RING, 16)
    pci.driver_ok()
    return transport, pci, driver


def _save(transport: vp.VirtioPciTransport) -> VirtioDeviceState:
    """What save_machine puts in a device section, through the encoder and back."""
    state = VirtioDeviceState(transport.save(), encode(transport.device.save()))
    return decode("device:test", encode(state), VirtioDeviceState)


def _restore(state: VirtioDeviceState, device: Any, mem: GuestMemory, sender: Sender | None = None) -> Any:
    transport = transport_for(device, mem, sender)
    transport.restore(state.transport)
    device.restore(decode("device:test", state.model, device.state_type))
    return transport


def test_a_restored_disk_serves_what_the_guest_queued_before_and_after(mem: GuestMemory, image: Path) -> None:
    old, pci, driver = _live_disk(mem, image)
    _read_request(mem, driver, 3)
    pci.kick(0)
    assert [length for _, length in driver.used_entries()] == [513]
    waiting = _read_request(mem, driver, 4)  # made available, never kicked: the pause came first
    state = _save(old)
    assert state.transport.queues[0].last_avail_idx == 1
    _close(old)

    new = _restore(state, VirtioBlock(image), mem)
    new.start_after_restore()  # serves the ring once: the lost kick costs nothing
    assert driver.used_entries() == [(waiting, 513)] and mem.read(DATA, 512) == bytes(range(0, 256)) * 2
    _read_request(mem, driver, 5)
    TransportDriver(new, mem).kick(0)
    entries = driver.used_entries()  # the MockDriver checks no head comes back twice
    assert len(entries) == 1 and mem.read_u16(driver.used + 2) == 3
    assert new.status == old.status and new.driver_features == F_VERSION_1 | F_EVENT_IDX
    assert new.queues[0].event_idx and new.queue_vectors == [1]
    _close(new)


def test_msix_routes_come_from_the_restored_table(mem: GuestMemory, image: Path) -> None:
    old, _, _ = _live_disk(mem, image)
    table = old.bar_device(1)
    assert table is not None
    table.write(16, struct.pack("<Q", 0xFEE0_1000))  # vector 1: programmed, unmasked
    table.write(24, struct.pack("<II", 0x4041, 0))
    state = _save(old)
    sender = Sender()
    new = _restore(state, VirtioBlock(image), mem, sender)
    assert sender.routed == {1: (0xFEE0_1000, 0x4041)}
    _close(new)
    _close(old)


def test_restored_bars_and_config_space_come_from_the_state(mem: GuestMemory, image: Path) -> None:
    old, _, _ = _live_disk(mem, image)
    old.config.write(0x10, 4, 0xD000_0000)  # the guest moved BAR 0
    old.config.write(0x04, 2, 0x6)
    state = _save(old)
    new = _restore(state, VirtioBlock(image), mem)
    assert new.config.bar_address(0) == 0xD000_0000 and new.config.command == 0x6
    _close(new)
    _close(old)


def test_console_input_pending_at_the_snapshot_is_delivered_after(mem: GuestMemory) -> None:
    old = transport_for(VirtioConsole(lambda data: None), mem)
    pci = TransportDriver(old, mem)
    pci.negotiate(F_VERSION_1)
    receive = pci.setup_queue(0, RING, 16)
    pci.setup_queue(1, 0x20000, 16)
    pci.driver_ok()
    console: Any = old.device
    console.enqueue_input(b"typed before the snapshot")  # no receive buffer posted yet
    state = _save(old)
    assert decode("m", state.model, ConsoleState).pending == b"typed before the snapshot"
    new = _restore(state, VirtioConsole(lambda data: None), mem)
    receive.add([Buffer(DATA, 64, writable=True)])
    new.start_after_restore()
    assert [length for _, length in receive.used_entries()] == [25]
    assert mem.read(DATA, 25) == b"typed before the snapshot"


# --- hostile state ------------------------------------------------------------------------
def _queue(state: VirtioDeviceState, **changes: Any) -> VirtioDeviceState:
    queues = (dataclasses.replace(state.transport.queues[0], **changes),)
    return dataclasses.replace(state, transport=dataclasses.replace(state.transport, queues=queues))


def _transport(state: VirtioDeviceState, **changes: Any) -> VirtioDeviceState:
    return dataclasses.replace(state, transport=dataclasses.replace(state.transport, **changes))


def _config_byte(state: VirtioDeviceState, offset: int, value: int) -> VirtioDeviceState:
    data = bytearray(state.transport.config.data)
    data[offset] = value
    return _transport(state, config=PciConfigState(bytes(data)))


HOSTILE: list[tuple[str, Callable[[VirtioDeviceState], VirtioDeviceState], str]] = [
    ("acked-not-offered", lambda s: _transport(s, driver_features=s.transport.driver_features | 1 << 60),
     "never offered"),
    ("offered-other", lambda s: _transport(s, device_features=s.transport.device_features ^ blk.F_FLUSH),
     "offered features"),
    ("ring-outside-ram", lambda s: _queue(s, device_addr=RAM - 8), "used ring"),
    ("ring-far-outside", lambda s: _queue(s, desc_addr=1 << 70), "64-bit"),
    ("queue-size", lambda s: _queue(s, size=24), "power of two"),
    ("queue-index", lambda s: _queue(s, last_avail_idx=70000), "16-bit"),
    ("queue-vector", lambda s: _transport(s, queue_vectors=(7,)), "MSI-X vectors"),
    ("config-vector", lambda s: _transport(s, config_vector=NO_VECTOR - 1), "MSI-X vectors"),
    ("queue-count", lambda s: _transport(s, queues=(), queue_vectors=()), "queues"),
    ("status", lambda s: _transport(s, status=0x1FF), "status"),
    ("isr", lambda s: _transport(s, isr=9), "ISR"),
    ("features-ok-without-version-1", lambda s: _transport(s, driver_features=F_EVENT_IDX), "VERSION_1"),
    ("vendor-id", lambda s: _config_byte(s, 0, 0x86), "read-only offset 0x0"),
    ("short-config-space", lambda s: _transport(s, config=PciConfigState(b"\0" * 64)), "64 bytes"),
    ("msix-table", lambda s: _transport(s, msix=MsixState(b"", ())), "MSI-X"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "change", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_transport_state_is_one_restore_error(
    mem: GuestMemory, image: Path, name: str, change: Callable[[VirtioDeviceState], VirtioDeviceState],
    message: str,
) -> None:  # fmt: skip
    old, _, _ = _live_disk(mem, image)
    bad = change(_save(old))
    device = VirtioBlock(image)
    with pytest.raises(RestoreError, match=message) as raised:
        transport_for(device, mem).restore(bad.transport)
    assert "\n" not in str(raised.value)
    device.close()
    _close(old)


def test_a_disk_image_of_another_size_is_refused(mem: GuestMemory, image: Path, tmp_path: Path) -> None:
    old, _, _ = _live_disk(mem, image)
    state = _save(old)
    other = tmp_path / "other.img"
    other.write_bytes(bytes(4096))
    device = VirtioBlock(other)
    with pytest.raises(ValueError, match="8 sectors; the snapshot's guest saw 128"):
        device.restore(decode("m", state.model, blk.BlockState))
    device.close()
    _close(old)


def test_console_input_over_the_limit_is_refused() -> None:
    with pytest.raises(ValueError, match="over"):
        VirtioConsole(lambda data: None).restore(ConsoleState(bytes(PENDING_LIMIT + 1)))


def test_a_truncated_or_mistyped_device_section_is_one_state_error(mem: GuestMemory, image: Path) -> None:
    old, _, _ = _live_disk(mem, image)
    data = encode(_save(old))
    for bad in (data[: len(data) // 2], data[:1], encode({"transport": 1, "model": b""})):
        with pytest.raises(StateError, match="snapshot section device:virtio-blk0") as raised:
            decode("device:virtio-blk0", bad, VirtioDeviceState)
        assert "\n" not in str(raised.value)
    forged = encode(QueueState(16, True, 0, 0, 0, 0, 0, False, signalled_used=-1))
    with pytest.raises(RestoreError, match="16-bit"):
        old.queues[0].restore(decode("q", forged, QueueState), mem)
    _close(old)


# --- the machine description ----------------------------------------------------------------
def _description(**changes: Any) -> MachineDescription:
    base = MachineDescription(
        1, 256 << 20, (RegionState(0, 256 << 20, 0),), "serial", "",
        nets=(NetConfig("tap0", "52:54:00:12:34:56", "eth0"),), rng=True,
        pci_slots=(PciSlot("virtio-net:eth0", 2), PciSlot("virtio-rng", 1)),
    )  # fmt: skip
    return dataclasses.replace(base, **changes)


def _check(described: MachineDescription) -> MachineDescription:
    return read_description({"machine": Section(2, encode(described))})


def test_the_description_builds_the_same_devices_in_the_same_slots() -> None:
    config = config_for_restore(_check(_description()), network_overrides=(("eth0", "tap7"),))
    assert config.rng and [net.tap for net in config.nets] == ["tap7"]
    assert config.nets[0].mac == "52:54:00:12:34:56"
    assert dict(config.pci_slots) == {"virtio-net:eth0": 2, "virtio-rng": 1}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"pci_slots": (PciSlot("virtio-net:eth0", 2), PciSlot("virtio-rng", 2))}, "distinct"),
        ({"pci_slots": (PciSlot("virtio-net:eth0", 2), PciSlot("virtio-rng", 40))}, "distinct"),
        ({"pci_slots": (PciSlot("virtio-net:eth0", 2),)}, "once each"),
        ({"pci_slots": (*_description().pci_slots, PciSlot("virtio-blk0", 3))}, "once each"),
    ],
)
def test_a_bad_description_of_the_devices_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(StateError, match=message):
        _check(_description(**changes))


def test_network_overrides_must_name_a_saved_interface() -> None:
    with pytest.raises(StateError, match="no such interface"):
        config_for_restore(_description(), network_overrides=(("wlan0", "tap1"),))


def test_intx_is_driven_again_from_the_restored_isr(mem: GuestMemory, image: Path) -> None:
    old, pci, driver = _live_disk(mem, image, intx=lambda level: None)
    _read_request(mem, driver, 3)
    pci.kick(0)  # MSI-X is off: the completion raises the ISR bit, and INTx with it
    state = _save(old)
    assert state.transport.isr == 1
    levels: list[bool] = []
    device = VirtioBlock(image)
    new = transport_for(device, mem, intx=levels.append)
    new.restore(state.transport)
    assert levels == []  # nothing happens before the irqchip is restored
    new.start_after_restore()
    assert levels == [True]
    assert TransportDriver(new, mem).read(vp.ISR_OFFSET, 1) == 1 and levels == [True, False]
    device.close()
    _close(old)


def _nic(tap: SocketTap, mac: bytes) -> VirtioNet:
    return VirtioNet(tap, mac, watch=lambda fd, handler: None, unwatch=lambda fd: None)  # type: ignore[arg-type]


def test_a_restored_nic_sets_its_acknowledged_offloads_on_the_tap_again(mem: GuestMemory) -> None:
    mac = bytes.fromhex("525400123456")
    old_tap, new_tap = SocketTap(), SocketTap()
    old = transport_for(_nic(old_tap, mac), mem)
    pci = TransportDriver(old, mem)
    pci.negotiate(F_VERSION_1 | net.F_GUEST_CSUM | net.F_GUEST_TSO4)
    pci.setup_queue(0, RING, 16)
    pci.setup_queue(1, 0x20000, 16)
    pci.driver_ok()
    state = _save(old)
    new = _restore(state, _nic(new_tap, mac), mem)
    assert new_tap.offloads == []
    new.start_after_restore()
    assert new_tap.offloads == [tun.TUN_F_CSUM | tun.TUN_F_TSO4] == old_tap.offloads
    with pytest.raises(ValueError, match="MAC 52:54:00:12:34:56"):
        _nic(SocketTap(), bytes(6)).restore(decode("m", state.model, net.NetState))
    old_tap.close()
    new_tap.close()


def test_mutated_device_sections_are_refused_or_restored_never_a_crash(mem: GuestMemory, image: Path) -> None:
    """Fuzzing the loader: random byte changes to a saved device section decode to a one-line
    StateError, restore to a RestoreError, or restore to a device whose broken rings are the
    guest's problem (needs reset) when it starts: never another exception."""
    import random

    old, pci, driver = _live_disk(mem, image)
    _read_request(mem, driver, 3)
    pci.kick(0)
    data = encode(_save(old))
    rng = random.Random(12)
    outcomes = {"decode": 0, "restore": 0, "ran": 0}
    for _ in range(300):
        mutated = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        device = VirtioBlock(image)
        try:
            state = decode("device:virtio-blk0", bytes(mutated), VirtioDeviceState)
            transport = _restore(state, device, mem)
        except StateError:
            outcomes["decode"] += 1
        except (RestoreError, ValueError) as error:
            assert "\n" not in str(error)
            outcomes["restore"] += 1
        else:
            transport.start_after_restore()
            outcomes["ran"] += 1
        finally:
            device.close()
    print(outcomes)
    assert all(outcomes.values()), outcomes  # every kind of outcome was reached
    _close(old)
