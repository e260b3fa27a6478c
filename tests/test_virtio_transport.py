"""Virtio devices behind the PCI transport: one lock per device, reset, and guest errors contained."""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.testing.fakes import SocketTap
from kvmpy.testing.virtio_driver import Buffer, TransportDriver
from kvmpy.virtio import pci_transport as vp
from kvmpy.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from kvmpy.virtio.devices import blk
from kvmpy.virtio.devices.blk import VirtioBlock
from kvmpy.virtio.devices.net import VirtioNet

RAM = 1 << 24
BAR0 = 0xC001_0000
HEADER, DATA, STATUS = 0x40000, 0x80000, 0x3F000


class Sender:
    def __init__(self) -> None:
        self.sent: list[int] = []

    def send(self, vector: int, address: int, data: int) -> None:
        self.sent.append(vector)

    def changed(self, vector: int, address: int, data: int) -> None:
        pass


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory.anonymous([(0, RAM)])
    yield memory
    memory.close()


def transport_for(device: object, mem: GuestMemory) -> tuple[vp.VirtioPciTransport, TransportDriver]:
    transport = vp.VirtioPciTransport(
        device,  # type: ignore[arg-type]
        mem,
        Sender(),
        BAR0,
        BAR0 + vp.BAR0_SIZE,
        lambda areas: None,
    )
    return transport, TransportDriver(transport, mem)


# --- issue 11: a reset while a request is in flight --------------------------------------
def test_reset_waits_for_the_request_in_flight(mem: GuestMemory, tmp_path: Path) -> None:
    """The driver resets while the event loop is inside a read: the request must complete into
    the ring it came from (or not at all), never into the fresh queue at guest address 4."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(range(256)) * 256)
    device = VirtioBlock(image)
    transport, pci = transport_for(device, mem)
    pci.negotiate(F_VERSION_1)
    driver = pci.setup_queue(0, 0x10000, 16)
    pci.driver_ok()
    entered, gate = threading.Event(), threading.Event()
    read = device._file.read

    def slow_read(offset: int, buffers: list[memoryview]) -> int:
        entered.set()
        gate.wait(5)
        return read(offset, buffers)

    device._file.read = slow_read  # type: ignore[method-assign]
    mem.write(HEADER, struct.pack("<IIQ", blk.T_IN, 0, 0))
    head = driver.add(
        [Buffer(HEADER, 16), Buffer(DATA, 512, writable=True), Buffer(STATUS, 1, writable=True)]
    )
    worker = threading.Thread(target=transport.notify, args=(0,))  # the ioeventfd handler
    worker.start()
    assert entered.wait(5)
    resetter = threading.Thread(target=pci.reset)  # the guest's status write, on a vCPU thread
    resetter.start()
    time.sleep(0.05)
    gate.set()
    worker.join(5)
    resetter.join(5)
    assert mem.read(0, 16) == bytes(16)  # nothing written below the rings
    assert transport.queues[0].next_used_idx == 0 and pci.status == 0
    assert driver.used_entries() == [(head, 513)]
    device.close()


# --- virtio-net transmit from two threads -------------------------------------------------
def net_device(mem: GuestMemory) -> tuple[VirtioNet, SocketTap, vp.VirtioPciTransport, TransportDriver]:
    tap = SocketTap()
    watched: dict[int, object] = {}
    device = VirtioNet(
        tap,  # type: ignore[arg-type]
        bytes(6),
        watch=lambda fd, handler: watched.__setitem__(fd, handler),
        unwatch=lambda fd: watched.pop(fd, None),
    )
    transport, pci = transport_for(device, mem)
    return device, tap, transport, pci


def test_transmit_kicked_from_two_threads_returns_each_head_once(mem: GuestMemory) -> None:
    """Debian's "output.0:id 2 is not a head!": kicks reach the TX queue both from vCPU notify
    exits and from the event loop. Chained and indirect buffers; every used id must be a
    head the driver published and still owns."""
    device, tap, transport, pci = net_device(mem)
    pci.negotiate(F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX)
    pci.setup_queue(0, 0x10000, 16)
    tx = pci.setup_queue(1, 0x20000, 16)
    pci.driver_ok()
    stop = threading.Event()
    errors: list[BaseException] = []

    def kick(via_exit: bool) -> None:
        try:
            while not stop.is_set():
                if via_exit:
                    pci.kick(1)
                else:
                    transport.notify(1)
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    def drain() -> None:
        tap.host.settimeout(0.05)
        while not stop.is_set():
            try:
                tap.host.recv(65536)
            except TimeoutError:
                pass

    threads = [threading.Thread(target=kick, args=(True,)), threading.Thread(target=kick, args=(False,))]
    threads.append(threading.Thread(target=drain))
    for thread in threads:
        thread.start()
    published = returned = 0
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and not errors:
            returned += len(tx.used_entries())
            if tx.free_descriptors >= 3:
                base = DATA + 0x1000 * (published % 64)
                layout = published % 3
                if layout == 0:  # header and data chained
                    tx.add([Buffer(base, 12), Buffer(base + 12, 100)])
                elif layout == 1:  # an indirect table of three
                    tx.add([Buffer(base, 12), Buffer(base + 12, 60), Buffer(base + 80, 40)], indirect=True)
                else:  # header pushed into the packet
                    tx.add([Buffer(base, 112)])
                published += 1
        stop.set()
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    transport.notify(1)
    returned += len(tx.used_entries())
    assert errors == []
    assert published > 100 and returned == published and tx.outstanding == 0
    assert device.packets_out + device.dropped == published
    tap.close()


# --- virtio-net receive: guest errors reach the transport's guard -------------------------
def receiving_net(mem: GuestMemory):  # type: ignore[no-untyped-def]
    tap = SocketTap()
    watched: dict[int, object] = {}
    device = VirtioNet(
        tap,  # type: ignore[arg-type]
        bytes(6),
        watch=lambda fd, handler: watched.__setitem__(fd, handler),
        unwatch=lambda fd: watched.pop(fd, None),
    )
    transport, pci = transport_for(device, mem)
    pci.negotiate(F_VERSION_1 | F_INDIRECT_DESC)
    rx = pci.setup_queue(0, 0x10000, 16, indirect_slots=32)
    pci.setup_queue(1, 0x30000, 16)
    pci.driver_ok()
    return device, tap, transport, pci, rx, watched


@pytest.mark.parametrize("breakage", ["avail-ahead", "short-chain", "long-chain"])
def test_receive_guest_errors_mark_the_device_and_stop_watching(mem: GuestMemory, breakage: str) -> None:
    """Before, the tap handler was registered bare: its QueueError escaped to the event loop,
    which (level-triggered, the tap still readable) called it again and again, a traceback each."""
    device, tap, transport, pci, rx, watched = receiving_net(mem)
    if breakage == "avail-ahead":
        mem.write_u16(rx.avail + 2, 40)
    elif breakage == "short-chain":
        rx.add([Buffer(DATA, 11, writable=True)])
    else:  # 20 buffers in a queue of 16 (and past IOV_MAX if the queue were long enough)
        rx.add([Buffer(DATA + 64 * i, 64, writable=True) for i in range(20)], indirect=True)
    tap.host.send(b"\0" * 12 + b"packet")
    handler = watched[tap.fd]
    handler()  # type: ignore[operator]
    assert pci.status & vp.STATUS_NEEDS_RESET
    assert tap.fd not in watched  # no spinning: the tap is not watched until the reset
    assert transport.guest_errors == 1
    pci.kick(0)  # an RX kick of a broken device does not start watching again
    assert tap.fd not in watched and transport.guest_errors == 1
    pci.reset()
    pci.negotiate(F_VERSION_1)
    rx = pci.setup_queue(0, 0x10000, 16)
    pci.setup_queue(1, 0x20000, 16)
    pci.driver_ok()
    rx.add([Buffer(DATA, 2048, writable=True)])
    watched[tap.fd]()  # type: ignore[operator]
    assert rx.used_entries() == [(0, 18)]
    assert mem.read(DATA + 12, 6) == b"packet"
    tap.close()


# --- virtio-console: a broken receive ring from activation or the input thread ------------
def broken_console(mem: GuestMemory):  # type: ignore[no-untyped-def]
    from kvmpy.virtio.devices.console import VirtioConsole

    output: list[bytes] = []
    device = VirtioConsole(output.append)
    transport, pci = transport_for(device, mem)
    pci.negotiate(F_VERSION_1)
    rx = pci.setup_queue(0, 0x10000, 16)
    pci.setup_queue(1, 0x20000, 16)
    mem.write_u16(rx.avail + 2, 40)  # the receive ring's index runs ahead
    return device, transport, pci


def test_console_input_pending_at_driver_ok_into_a_broken_ring(mem: GuestMemory) -> None:
    device, transport, pci = broken_console(mem)
    assert device.enqueue_input(b"typed early") == 11  # no driver yet: kept
    pci.driver_ok()  # before: QueueError out of the status write, the VM stopped as a host error
    assert pci.status & vp.STATUS_NEEDS_RESET and transport.guest_errors == 1


def test_console_input_thread_survives_a_broken_ring(mem: GuestMemory) -> None:
    device, transport, pci = broken_console(mem)
    pci.driver_ok()
    assert device.enqueue_input(b"a") == 1  # before: QueueError killed the input thread
    assert pci.status & vp.STATUS_NEEDS_RESET
    assert device.enqueue_input(b"b") == 1 and transport.guest_errors == 1  # quiet until reset
    pci.reset()
    pci.negotiate(F_VERSION_1)
    rx = pci.setup_queue(0, 0x10000, 16)
    pci.setup_queue(1, 0x20000, 16)
    pci.driver_ok()
    rx.add([Buffer(DATA, 64, writable=True)])
    pci.kick(0)
    assert rx.used_entries() == [(0, 2)] and mem.read(DATA, 2) == b"ab"


# --- PATCH /drives after boot: another backing file ----------------------------------------
def test_a_new_backing_file_changes_the_capacity_and_tells_the_driver(
    mem: GuestMemory, tmp_path: Path
) -> None:
    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first.write_bytes(b"A" * 512 * 8)
    second.write_bytes(b"B" * 512 * 32)
    device = VirtioBlock(first)
    transport, pci = transport_for(device, mem)
    pci.negotiate(F_VERSION_1)
    driver = pci.setup_queue(0, 0x10000, 16)
    pci.driver_ok()
    capacity = vp.DEVICE_OFFSET  # virtio-blk's first configuration field
    generation = pci.read(21, 1)
    assert pci.read(capacity, 8) == 8
    with pytest.raises(Exception, match="does not exist|No such file"):
        device.replace_backing(tmp_path / "missing.img")
    assert pci.read(capacity, 8) == 8  # a bad path changes nothing
    device.replace_backing(second)
    transport.config_changed()
    assert pci.read(capacity, 8) == 32
    assert pci.read(21, 1) == (generation + 1) & 0xFF  # the driver rereads the configuration
    assert pci.read(vp.ISR_OFFSET, 1) & 2  # the configuration-change interrupt cause
    mem.write(0x20000, struct.pack("<IIQ", blk.T_IN, 0, 0))  # read sector 0
    driver.add([Buffer(0x20000, 16), Buffer(0x21000, 512, writable=True), Buffer(0x22000, 1, writable=True)])
    pci.kick(0)
    assert driver.used_entries() and mem.read(0x22000, 1) == bytes([blk.S_OK])
    assert mem.read(0x21000, 512) == b"B" * 512  # served from the new image
