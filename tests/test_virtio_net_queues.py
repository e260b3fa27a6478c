"""virtio-net's mergeable receive buffers and queue pairs (VIRTIO_NET_F_MRG_RXBUF, _MQ, _CTRL_VQ).

The device model is driven through its PCI transport by the test's driver, on stand-in taps
(datagram socket pairs, one packet per datagram); a real multi-queue tap of this host checks
the queue attachment the model relies on. Linux's own driver runs both in the lab
(tests/test_lab_linux.py, the virtio_net_mq scenarios).
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy.errors import ConfigError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.testing.fakes import FakeKernelVhost, NullMsiSender, SocketTap
from kvmpy.testing.virtio_driver import Buffer, MockDriver, TransportDriver
from kvmpy.virtio import pci_transport as vp
from kvmpy.virtio.device import F_VERSION_1
from kvmpy.virtio.devices import net
from kvmpy.virtio.devices.net import NetState, VirtioNet
from kvmpy.virtio.devices.tap import Tap, is_multi_queue, open_taps, queue_pairs
from kvmpy.virtio.queue import SplitQueue
from kvmpy.vmm.config import NetConfig

RAM = 1 << 24
BAR0 = 0xC001_0000
DATA, COMMAND = 0x100000, 0x3F000


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory.anonymous([(0, RAM)])
    yield memory
    memory.close()


class Nic:
    """A VirtioNet on stand-in taps with its transport and driver; ``watched`` is the event loop."""

    def __init__(self, mem: GuestMemory, pairs: int = 1) -> None:
        self.mem = mem
        self.taps = [SocketTap() for _ in range(pairs)]
        self.watched: dict[int, object] = {}
        self.device = VirtioNet(
            self.taps if pairs > 1 else self.taps[0],  # type: ignore[arg-type]
            bytes(6),
            watch=self.watched.__setitem__,
            unwatch=lambda fd: self.watched.pop(fd, None),
        )
        self.transport = vp.VirtioPciTransport(
            self.device, mem, NullMsiSender(), BAR0, BAR0 + vp.BAR0_SIZE, lambda areas: None  # type: ignore[arg-type]
        )
        self.pci = TransportDriver(self.transport, mem)
        self.queues: list[MockDriver] = []

    def start(self, features: int) -> None:
        self.pci.negotiate(features)
        self.queues = [
            self.pci.setup_queue(index, 0x10000 + 0x4000 * index, 16)
            for index in range(len(self.device.queue_sizes))
        ]
        self.pci.driver_ok()

    def receive(self, pair: int = 0) -> None:
        handler = self.watched[self.taps[pair].fd]
        handler()  # type: ignore[operator]

    def command(self, request: bytes) -> int:
        """One control-queue request; the device's one-byte answer."""
        control = self.queues[-1]
        self.mem.write(COMMAND, request[:2])
        self.mem.write(COMMAND + 16, request[2:])
        self.mem.write(COMMAND + 32, b"\xff")
        answer = Buffer(COMMAND + 32, 1, writable=True)
        control.add([Buffer(COMMAND, 2), Buffer(COMMAND + 16, len(request) - 2), answer])
        self.pci.kick(len(self.queues) - 1)
        assert [length for _, length in control.used_entries()] == [1]
        return self.mem.read(COMMAND + 32, 1)[0]

    def close(self) -> None:
        self.device.close()


def header(packet: bytes) -> bytes:
    return bytes(12) + packet


# --- mergeable receive buffers --------------------------------------------------------------
def test_a_packet_spreads_over_as_many_mergeable_buffers_as_it_needs(mem: GuestMemory) -> None:
    nic = Nic(mem)
    nic.start(F_VERSION_1 | net.F_MRG_RXBUF)
    rx = nic.queues[0]
    heads = [rx.add([Buffer(DATA + 0x1000 * i, 100, writable=True)]) for i in range(6)]
    payload = bytes(range(256)) + b"tail of the packet" * 2
    nic.taps[0].host.send(header(payload))
    nic.taps[0].host.send(header(b"small"))
    nic.receive()
    used = rx.used_entries()
    length = 12 + len(payload)  # 304 bytes: three full buffers and four bytes of a fourth
    assert used == [(heads[0], 100), (heads[1], 100), (heads[2], 100), (heads[3], 4), (heads[4], 17)]
    received = b"".join(mem.read(DATA + 0x1000 * i, n) for i, (_, n) in enumerate(used[:4]))
    assert len(received) == length and received[12:] == payload
    assert struct.unpack_from("<H", received, 10)[0] == 4  # num_buffers: the driver's count
    assert struct.unpack_from("<H", mem.read(DATA + 0x4000 + 10, 2))[0] == 1
    assert mem.read(DATA + 0x4000 + 12, 5) == b"small"
    assert nic.device.packets_in == 2 and nic.device.dropped == 0
    nic.close()


def test_too_few_mergeable_buffers_drop_the_packet_and_wait_for_more(mem: GuestMemory) -> None:
    nic = Nic(mem)
    nic.start(F_VERSION_1 | net.F_MRG_RXBUF)
    rx = nic.queues[0]
    first = [rx.add([Buffer(DATA + 0x1000 * i, 100, writable=True)]) for i in range(2)]
    nic.taps[0].host.send(header(bytes(500)))  # 512 bytes for 200 bytes of buffers
    nic.receive()
    assert rx.used_entries() == [] and nic.device.dropped == 1 and nic.device.packets_in == 0
    assert nic.taps[0].fd not in nic.watched  # no spinning on a ring without room
    rx.add([Buffer(DATA + 0x1000 * 2, 100, writable=True)])
    nic.pci.kick(0)  # more buffers: receiving goes on, from the buffers given back
    nic.taps[0].host.send(header(b"next"))
    nic.receive()
    assert rx.used_entries() == [(first[0], 16)]
    assert mem.read(DATA + 12, 4) == b"next"
    nic.close()


def test_without_mergeable_buffers_each_packet_takes_one_chain(mem: GuestMemory) -> None:
    nic = Nic(mem)
    nic.start(F_VERSION_1)
    rx = nic.queues[0]
    mem.write(DATA, b"\xee" * 12)
    head = rx.add([Buffer(DATA, 12, writable=True), Buffer(DATA + 0x100, 1514, writable=True)])
    nic.taps[0].host.send(header(b"whole"))
    nic.receive()
    assert rx.used_entries() == [(head, 17)]
    assert mem.read(DATA + 10, 2) == b"\1\0"  # num_buffers is 1 (the tap leaves it alone)
    assert mem.read(DATA + 0x100, 5) == b"whole"
    nic.close()


def test_a_header_straddling_two_buffers_gets_its_count(mem: GuestMemory) -> None:
    nic = Nic(mem)
    nic.start(F_VERSION_1 | net.F_MRG_RXBUF)
    rx = nic.queues[0]
    rx.add([Buffer(DATA, 11, writable=True), Buffer(DATA + 0x100, 40, writable=True)])
    rx.add([Buffer(DATA + 0x1000, 64, writable=True)])
    nic.taps[0].host.send(header(bytes(80)))
    nic.receive()
    assert [n for _, n in rx.used_entries()] == [51, 41]
    assert mem.read(DATA + 10, 1) + mem.read(DATA + 0x100, 1) == b"\2\0"
    nic.close()


# --- queue pairs and the control queue --------------------------------------------------------
def test_several_pairs_offer_multiqueue_and_a_control_queue(mem: GuestMemory) -> None:
    nic = Nic(mem, pairs=2)
    device = nic.device
    assert device.queue_sizes == (256, 256, 256, 256, 64)
    assert device.features & net.F_MQ and device.features & net.F_CTRL_VQ
    assert struct.unpack("<H", device.read_config(8, 2))[0] == 2  # max_virtqueue_pairs
    assert [tap.attached for tap in nic.taps] == [False, False]  # no packet before the driver is ready
    single = Nic(mem)
    assert single.device.queue_sizes == (256, 256) and not single.device.features & net.F_MQ
    single.close()
    nic.close()


def test_the_driver_turns_pairs_on_and_off_through_the_control_queue(mem: GuestMemory) -> None:
    nic = Nic(mem, pairs=2)
    nic.start(F_VERSION_1 | net.F_MQ | net.F_CTRL_VQ)
    assert list(nic.watched) == [nic.taps[0].fd]
    pairs_set = bytes([net.CTRL_MQ, net.CTRL_MQ_VQ_PAIRS_SET])
    assert nic.command(pairs_set + struct.pack("<H", 2)) == net.CTRL_OK
    assert [tap.attached for tap in nic.taps] == [True, True]
    assert sorted(nic.watched) == sorted(tap.fd for tap in nic.taps)
    rx1, tx1 = nic.queues[2], nic.queues[3]
    head = rx1.add([Buffer(DATA, 2048, writable=True)])
    nic.taps[1].host.send(header(b"to pair 1"))
    nic.receive(1)
    assert rx1.used_entries() == [(head, 21)] and mem.read(DATA + 12, 9) == b"to pair 1"
    mem.write(DATA + 0x1000, header(b"from pair 1"))
    tx1.add([Buffer(DATA + 0x1000, 23)])
    nic.pci.kick(3)
    assert nic.taps[1].host.recv(100) == header(b"from pair 1")
    for bad in (struct.pack("<H", 3), struct.pack("<H", 0)):
        assert nic.command(pairs_set + bad) == net.CTRL_ERR
    assert nic.command(bytes([0, 1]) + b"\0\0") == net.CTRL_ERR  # VIRTIO_NET_CTRL_RX: not offered
    assert nic.command(pairs_set + struct.pack("<H", 1)) == net.CTRL_OK
    assert [tap.attached for tap in nic.taps] == [True, False] and list(nic.watched) == [nic.taps[0].fd]
    nic.command(pairs_set + struct.pack("<H", 2))
    nic.pci.reset()  # a reset goes back to one pair, and takes no packet until it is ready again
    assert [tap.attached for tap in nic.taps] == [False, False] and nic.watched == {}
    nic.close()


def test_pairs_set_without_multiqueue_acknowledged_is_refused(mem: GuestMemory) -> None:
    nic = Nic(mem, pairs=2)
    nic.start(F_VERSION_1 | net.F_CTRL_VQ)
    request = bytes([net.CTRL_MQ, net.CTRL_MQ_VQ_PAIRS_SET]) + struct.pack("<H", 2)
    assert nic.command(request) == net.CTRL_ERR
    assert [tap.attached for tap in nic.taps] == [True, False]
    nic.close()


def test_a_control_request_without_room_for_the_answer_needs_reset(mem: GuestMemory) -> None:
    nic = Nic(mem, pairs=2)
    nic.start(F_VERSION_1 | net.F_MQ | net.F_CTRL_VQ)
    nic.queues[-1].add([Buffer(COMMAND, 4)])
    nic.pci.kick(4)
    assert nic.pci.status & vp.STATUS_NEEDS_RESET
    nic.close()


def test_the_pairs_in_use_are_saved_and_checked_on_restore(mem: GuestMemory) -> None:
    nic = Nic(mem, pairs=2)
    nic.start(F_VERSION_1 | net.F_MQ | net.F_CTRL_VQ)
    nic.command(bytes([net.CTRL_MQ, net.CTRL_MQ_VQ_PAIRS_SET]) + struct.pack("<H", 2))
    state = nic.device.save()
    assert state.active_pairs == 2
    other = Nic(mem, pairs=2)
    other.device.restore(state)
    assert other.device.save().active_pairs == 2
    with pytest.raises(ValueError, match="uses 3 of its 2 queue pairs"):
        other.device.restore(NetState(state.config, 3))
    assert NetState(state.config).active_pairs == 1  # a snapshot from before queue pairs
    other.close()
    nic.close()


# --- options and the host's taps ----------------------------------------------------------------
def test_queue_options() -> None:
    assert NetConfig.parse("tap=t0").queues == 0
    assert NetConfig.parse("tap=t0,queues=2").queues == 2
    for bad in ("queues=0", "queues=17", "queues=two"):
        with pytest.raises(ConfigError, match=r"use .*queues=1\.\.16"):
            NetConfig.parse(f"tap=t0,{bad}")


needs_taps = pytest.mark.skipif(
    not Path("/dev/net/tun").exists() or os.geteuid() != 0, reason="needs /dev/net/tun and root"
)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def tap_name() -> Iterator[str]:
    name = f"kvmpyq{os.getpid() % 100000}"
    yield name
    subprocess.run(["ip", "link", "del", name], capture_output=True)


def _udp_frame(port: int) -> bytes:
    """An Ethernet frame of a UDP/IPv4 flow from ``port``: the tap hashes flows onto queues."""
    source, destination = bytes([10, 9, 0, 1]), bytes([10, 9, 0, 2])
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + 4, 0, 0, 64, 17, 0, source, destination)
    ethernet = b"\x52\x54\x00\x00\x00\x02" + b"\x52\x54\x00\x00\x00\x01" + b"\x08\x00"
    return ethernet + ip + struct.pack("!HHHH", port, 9, 12, 0) + b"data"


def _drain(tap: Tap) -> int:
    """How many of the test's frames wait on this queue (the kernel sends some of its own)."""
    count = 0
    while True:
        try:
            packet = os.read(tap.fd, 65536)
        except BlockingIOError:
            return count
        count += packet.endswith(b"data")


@needs_taps
def test_a_multi_queue_tap_steers_only_to_attached_queues(tap_name: str) -> None:
    import socket

    assert is_multi_queue(tap_name) is None and queue_pairs(tap_name, 0, cpus=2) == 2
    taps = open_taps(tap_name, 2)
    try:
        assert is_multi_queue(tap_name) is True
        _ip("link", "set", tap_name, "up")
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind((tap_name, 0))
        taps[1].set_attached(False)
        for port in range(1000, 1064):
            sender.send(_udp_frame(port))
        assert (_drain(taps[0]), _drain(taps[1])) == (64, 0)  # a detached queue gets nothing
        taps[1].set_attached(True)
        taps[1].set_attached(True)  # twice is once
        for port in range(2000, 2064):
            sender.send(_udp_frame(port))
        spread = (_drain(taps[0]), _drain(taps[1]))
        assert sum(spread) == 64 and min(spread) > 0, spread  # 64 flows hashed over both queues
        sender.close()
    finally:
        for tap in taps:
            tap.close()


@needs_taps
def test_a_device_not_yet_activated_takes_no_packet_from_a_shared_tap(tap_name: str) -> None:
    """A migration's destination on the same host opens the source's multi-queue tap while the
    source still serves it: until the destination's driver state makes the device active, the
    kernel must steer every packet to the source's queues."""
    import socket

    source = open_taps(tap_name, 2)  # the source VMM's queues, attached
    destination = VirtioNet(open_taps(tap_name, 2), bytes(6), watch=lambda fd, handler: None,
                            unwatch=lambda fd: None)  # fmt: skip
    try:
        _ip("link", "set", tap_name, "up")
        assert [tap.attached for tap in destination._taps] == [False, False]
        sender = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        sender.bind((tap_name, 0))
        for port in range(3000, 3064):
            sender.send(_udp_frame(port))
        sender.close()
        assert sum(_drain(tap) for tap in source) == 64
        assert sum(_drain(tap) for tap in destination._taps) == 0
    finally:
        destination.close()
        for tap in source:
            tap.close()


@needs_taps
def test_a_single_queue_tap_gets_one_pair(tap_name: str) -> None:
    _ip("tuntap", "add", "dev", tap_name, "mode", "tap", "vnet_hdr")
    assert is_multi_queue(tap_name) is False
    assert queue_pairs(tap_name, 0, cpus=4) == 1 and queue_pairs(tap_name, 1, cpus=4) == 1
    with pytest.raises(ConfigError, match=f"tap {tap_name} has a single queue.*mode tap multi_queue"):
        queue_pairs(tap_name, 2, cpus=4)
    taps = open_taps(tap_name, 1)
    taps[0].close()
    subprocess.run(["ip", "link", "del", tap_name], capture_output=True)
    _ip("tuntap", "add", "dev", tap_name, "mode", "tap", "vnet_hdr", "multi_queue")
    assert queue_pairs(tap_name, 0, cpus=4) == 4
    taps = open_taps(tap_name, 1)  # one queue of a multi-queue tap: opened as one
    taps[0].close()
    assert isinstance(taps[0], Tap)


# --- vhost-net: pause, snapshots and dirty tracking take the rings back ----------------------
class KernelNic(Nic):
    def __init__(self, mem: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
        from kvmpy.virtio.vhost import net as vhost_net

        monkeypatch.setattr(vhost_net, "KernelVhost", FakeKernelVhost)
        self.mem = mem
        self.taps = [SocketTap()]
        self.watched = {}
        self.device = vhost_net.VhostNet(
            self.taps[0],  # type: ignore[arg-type]
            bytes(6),
            watch=self.watched.__setitem__,
            unwatch=lambda fd: self.watched.pop(fd, None),
        )
        self.transport = vp.VirtioPciTransport(
            self.device, mem, NullMsiSender(), BAR0, BAR0 + vp.BAR0_SIZE, lambda areas: None  # type: ignore[arg-type]
        )
        self.pci = TransportDriver(self.transport, mem)
        self.kicks = {index: os.eventfd(0, os.EFD_NONBLOCK) for index in (0, 1)}
        self.device.kicks_wired(self.kicks)
        self.vhost: FakeKernelVhost = self.device._vhosts[0]  # type: ignore[assignment]

    def kernel_receives(self, packet: bytes) -> None:
        """The kernel's part: take the next receive chain, fill it, publish it."""
        ring = self.transport.queues[0]
        kernel = SplitQueue(16)
        kernel.size, kernel.ready, kernel.desc_addr = ring.size, True, ring.desc_addr
        kernel.driver_addr, kernel.device_addr = ring.driver_addr, ring.device_addr
        kernel.last_avail_idx = kernel.next_used_idx = self.vhost.bases[0]
        chain = kernel.pop(self.mem)
        assert chain is not None
        chain.writable[0][: len(packet)] = packet
        kernel.push(self.mem, chain.head, len(packet))
        self.vhost.bases[0] = kernel.last_avail_idx

    def close(self) -> None:
        super().close()
        for kick in self.kicks.values():
            os.close(kick)


def test_vhost_net_pause_takes_the_rings_back_and_resume_hands_them_over(
    mem: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    nic = KernelNic(mem, monkeypatch)
    nic.start(F_VERSION_1 | net.F_MRG_RXBUF)
    rx = nic.queues[0]
    for i in range(3):
        rx.add([Buffer(DATA + 0x1000 * i, 2048, writable=True)])
    assert nic.vhost.backends == {0: nic.taps[0].fd, 1: nic.taps[0].fd} and nic.vhost.acked & net.F_MRG_RXBUF
    nic.kernel_receives(header(b"by the kernel"))
    nic.device.pause()
    assert nic.vhost.backends == {0: None, 1: None} and nic.vhost.stops == 2
    queue = nic.transport.queues[0]
    assert (queue.last_avail_idx, queue.next_used_idx) == (1, 1)  # where the kernel left it
    assert nic.device.save().active_pairs == 1
    assert nic.transport.save().queues[0].last_avail_idx == 1  # a snapshot's rings agree
    nic.device.pause()  # twice is once
    assert nic.vhost.stops == 2
    nic.device.resume()
    assert nic.vhost.bases[0] == 1 and nic.vhost.backends[0] == nic.taps[0].fd
    assert rx.used_entries() == [(0, 25)]
    nic.close()


def test_vhost_net_serves_its_queues_in_python_while_pages_are_tracked(
    mem: GuestMemory, monkeypatch: pytest.MonkeyPatch
) -> None:
    nic = KernelNic(mem, monkeypatch)
    nic.start(F_VERSION_1 | net.F_MRG_RXBUF)
    rx, tx = nic.queues[0], nic.queues[1]
    for i in range(3):
        rx.add([Buffer(DATA + 0x1000 * i, 2048, writable=True)])
    nic.kernel_receives(header(b"by the kernel"))
    nic.device.track_writes(True)  # a migration starts: GuestMemory must see every write
    assert nic.vhost.backends == {0: None, 1: None}
    nic.taps[0].host.send(header(b"by kvmpy"))
    nic.receive()  # the tap is kvmpy's now, from the next buffer on
    assert rx.used_entries() == [(0, 25), (1, 20)] and mem.read(DATA + 0x1000 + 12, 8) == b"by kvmpy"
    mem.write(DATA + 0x8000, header(b"sent by kvmpy"))
    tx.add([Buffer(DATA + 0x8000, 25)])
    os.eventfd_write(nic.kicks[1], 1)  # the guest's kick, through the ioeventfd kvmpy now watches
    nic.watched[nic.kicks[1]]()  # type: ignore[operator]
    assert nic.taps[0].host.recv(100) == header(b"sent by kvmpy")
    nic.device.track_writes(False)  # the migration was cancelled: back to the kernel
    assert nic.vhost.bases == {0: 2, 1: 1} and nic.vhost.backends[0] == nic.taps[0].fd
    assert nic.taps[0].fd not in nic.watched and nic.kicks[1] not in nic.watched
    nic.close()
