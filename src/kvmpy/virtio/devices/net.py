"""virtio-net (virtio 1.x, 5.1) on a tap device, with one or several queue pairs.

Packets cross with their virtio-net header: the tap speaks the same header
(IFF_VNET_HDR), so checksum and segmentation offloads pass straight through
and packet data moves with ``os.readv``/``os.writev`` between the tap and
memoryviews of guest buffers. Receive is driven by the tap becoming readable
(watched only while the guest has posted buffers), transmit by the guest's
kick on the transmit queue.

Two receive layouts, as the driver chooses: one chain per packet, large enough
for the largest (Linux's "big packets"), or, with mergeable receive buffers
(VIRTIO_NET_F_MRG_RXBUF), small buffers of which a packet takes as many as it
needs, its header saying how many. The packet is read straight into the first
buffer; a longer one spills into a bounce buffer that is copied into the next
ones, so only the tail of a large packet is copied.

Several queue pairs (VIRTIO_NET_F_MQ) sit on a multi-queue tap, one tap queue
per pair, which the driver turns on through the control queue; the pairs it
does not use are detached from the tap so the kernel steers no packet to them.
"""

from __future__ import annotations

import functools
import logging
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kvmpy.abi import tun
from kvmpy.errors import ConfigError, GuestError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.ratelimit import guest_log
from kvmpy.virtio.device import COMMON_FEATURES, TYPE_NET, Interrupt
from kvmpy.virtio.devices.tap import MAX_QUEUE_PAIRS, VNET_HEADER_SIZE, Tap
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import DescriptorChain, SplitQueue
from kvmpy.virtio.throttle import Throttle

log = logging.getLogger("kvmpy.virtio")

F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
F_CTRL_VQ = 1 << 17
F_MQ = 1 << 22
LINK_UP = 1
RX, TX = 0, 1
QUEUE_SIZE = 256
CONTROL_QUEUE_SIZE = 64
#: The control queue's one command class and command kvmpy serves (virtio 1.x, 5.1.6.5.5).
CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET = 4, 0
CTRL_OK, CTRL_ERR = 0, 1
#: A control request's class, command and the largest argument kvmpy reads (a u16).
CTRL_REQUEST_MAX = 4
#: Packets handled per wake-up before yielding to other devices.
BATCH = 64
#: readv/writev take at most IOV_MAX (1024) buffers; a longer chain is the guest's error.
MAX_BUFFERS = 1024
#: The largest packet a tap hands over: a 64 KiB GSO packet with its Ethernet and VLAN
#: headers, after the virtio-net header. The mergeable path's bounce buffer holds one.
MAX_PACKET = VNET_HEADER_SIZE + 14 + 4 + 0xFFFF
#: Where the header's num_buffers field is (the tap leaves it alone: the device sets it).
NUM_BUFFERS_OFFSET = 10


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        mac = bytes(int(part, 16) for part in parts)
    except ValueError:
        mac = b""
    if len(mac) != 6 or len(parts) != 6:
        raise ConfigError(f"invalid MAC address {text!r}: use six hex bytes like 52:54:00:12:34:56")
    return mac


def tap_offloads(acked_features: int) -> int:
    """What the tap may hand the guest: only the offloads its driver accepted."""
    offloads = 0
    if acked_features & F_GUEST_CSUM:
        offloads |= tun.TUN_F_CSUM
        if acked_features & F_GUEST_TSO4:
            offloads |= tun.TUN_F_TSO4
        if acked_features & F_GUEST_TSO6:
            offloads |= tun.TUN_F_TSO6
    return offloads


@dataclass(frozen=True, slots=True)
class NetState:
    """The configuration the guest read (MAC, link status, queue pairs) and how many pairs
    it turned on. Offloads and the receive layout are the acknowledged features, set again
    when the transport reactivates the device; no packet is held between the tap and the
    rings, so nothing else is pending."""

    config: bytes
    active_pairs: int = 1




class VirtioNet:
    device_type = TYPE_NET
    features = (
        COMMON_FEATURES | F_MAC | F_STATUS | F_CSUM | F_GUEST_CSUM
        | F_HOST_TSO4 | F_HOST_TSO6 | F_GUEST_TSO4 | F_GUEST_TSO6 | F_MRG_RXBUF
    )  # fmt: skip

    def __init__(
        self,
        taps: Tap | Sequence[Tap],
        mac: bytes,
        watch: Callable[[int, Callable[[], None]], None],
        unwatch: Callable[[int], None],
        *,
        rx_throttle: Throttle | None = None,
        tx_throttle: Throttle | None = None,
    ) -> None:
        #: One tap queue per queue pair.
        self._taps: list[Tap] = list(taps) if isinstance(taps, (list, tuple)) else [taps]  # type: ignore[list-item]
        pairs = self.queue_pairs = len(self._taps)
        if not 1 <= pairs <= MAX_QUEUE_PAIRS:
            raise ConfigError(f"virtio-net with {pairs} queue pairs: use 1 to {MAX_QUEUE_PAIRS}")
        #: Receive and transmit queue of each pair, then (with several pairs) the control queue.
        self.queue_sizes: tuple[int, ...] = (QUEUE_SIZE, QUEUE_SIZE) * pairs + (
            (CONTROL_QUEUE_SIZE,) if pairs > 1 else ()
        )
        self.features = type(self).features | (F_CTRL_VQ | F_MQ if pairs > 1 else 0)
        self._control_queue = 2 * pairs
        self._config = mac + struct.pack("<HH", LINK_UP, pairs)
        self._watch, self._unwatch = watch, unwatch
        self.guard = DeviceGuard()
        #: Rate limiters of each direction (bytes and packets), shared by the pairs; None: unlimited.
        self.rx_throttle, self.tx_throttle = rx_throttle, tx_throttle
        self._mem: GuestMemory | None = None
        self._queues: list[SplitQueue] = []
        self._interrupt: Interrupt | None = None
        self._acked = 0
        #: Pairs whose tap is watched for packets to receive.
        self._watching: set[int] = set()
        #: Queue pairs the driver turned on (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET); one until it does.
        self._active = 1
        #: Where the part of a packet beyond the first mergeable buffer is read to.
        self._bounce = memoryview(bytearray(MAX_PACKET))
        self.packets_in = self.packets_out = 0
        #: Packets dropped: transmit ones the tap refused, received ones the ring had no room for.
        self.dropped = 0
        #: Host-side receive failures (the tap read failed for a reason of its own).
        self.errors = 0
        self._attach_active()

    def read_config(self, offset: int, size: int) -> bytes:
        return self._config[offset : offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    @property
    def mac(self) -> bytes:
        return self._config[:6]

    # --- state ----------------------------------------------------------------------------
    state_type = NetState

    def save(self) -> NetState:
        return NetState(self._config, self._active)

    def restore(self, state: NetState) -> None:
        if state.config != self._config:
            mac = ":".join(f"{byte:02x}" for byte in state.config[:6])
            raise ValueError(f"saved virtio-net configuration (MAC {mac}) is not this interface's")
        if not 1 <= state.active_pairs <= self.queue_pairs:
            pairs = self.queue_pairs
            raise ValueError(f"saved virtio-net uses {state.active_pairs} of its {pairs} queue pairs")
        with self.guard.lock:
            self._active = state.active_pairs  # applied when the transport reactivates the device

    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        self._set_offloads(acked_features)
        with self.guard.lock:
            self._mem, self._queues, self._interrupt = mem, queues, interrupt
            self._acked = acked_features
            self._use_pairs(self._active)

    def _set_offloads(self, acked_features: int) -> None:
        for tap in self._taps:
            tap.set_offloads(tap_offloads(acked_features))

    def reset(self) -> None:
        with self.guard.lock:
            self._mem, self._queues, self._interrupt = None, [], None
            self._use_pairs(1)

    def close(self) -> None:
        with self.guard.lock:
            for pair in range(self.queue_pairs):
                self._stop_receiving(pair)
        for tap in self._taps:
            tap.close()
        for throttle in (self.rx_throttle, self.tx_throttle):
            if throttle is not None:
                throttle.close()

    def queue_notify(self, index: int) -> None:
        with self.guard.lock:
            if index == self._control_queue:
                self._control()
            elif index % 2 == TX:
                self._transmit(index // 2)
            else:
                self._start_receiving(index // 2)

    # --- queue pairs ------------------------------------------------------------------------
    def _use_pairs(self, pairs: int) -> None:
        """Serve the first ``pairs`` queue pairs (lock held): their tap queues attached and,
        while the device runs, watched; the others detached and left alone."""
        self._active = pairs
        self._attach_active()
        for pair in range(self.queue_pairs):
            if pair < pairs and self._mem is not None:
                self._start_receiving(pair)
            else:
                self._stop_receiving(pair)

    def _attach_active(self) -> None:
        if self.queue_pairs == 1:
            return  # a single queue is never detached
        serving = self._mem is not None  # activated: before that (and after a reset) no queue
        # is attached, so a VM being built, restored or migrated in takes no packet from a tap
        # another VMM still serves (a migration's source on the same host)
        for pair, tap in enumerate(self._taps):
            try:
                tap.set_attached(serving and pair < self._active)
            except OSError as error:  # the host's side: that queue keeps what the kernel gives it
                message = "virtio-net: attaching tap queue %d failed: %s"
                guest_log.warning(log, ("virtio-net-queue", id(self)), message, pair, error.strerror)

    # --- control queue: the driver's commands ----------------------------------------------
    def _control(self) -> None:
        mem, interrupt = self._mem, self._interrupt
        if mem is None or interrupt is None:
            return
        queue = self._queues[self._control_queue]
        answered = 0
        while (chain := queue.pop(mem)) is not None:  # at most the queue's size: pending is bounded
            if chain.writable_length < 1:
                raise GuestError("virtio-net control request without room for its answer")
            answer = self._command(_gather(chain.readable, CTRL_REQUEST_MAX))
            _store_at(chain.writable, 0, bytes([answer]))
            queue.push(mem, chain.head, 1)
            answered += 1
        if answered and queue.needs_interrupt(mem):
            interrupt(self._control_queue)

    def _command(self, request: bytes) -> int:
        """Answer one control request: VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET is the one kvmpy serves
        (the other classes need features it does not offer)."""
        if (
            self._acked & F_MQ and len(request) == CTRL_REQUEST_MAX
            and request[0] == CTRL_MQ and request[1] == CTRL_MQ_VQ_PAIRS_SET
        ):  # fmt: skip
            pairs = int.from_bytes(request[2:4], "little")
            if 1 <= pairs <= self.queue_pairs:
                self._use_pairs(pairs)
                return CTRL_OK
        return CTRL_ERR

    # --- receive: tap -> guest -----------------------------------------------------------
    def _start_receiving(self, pair: int) -> None:
        if pair not in self._watching and self._mem is not None and pair < self._active:
            self._watching.add(pair)
            self._watch(self._taps[pair].fd, functools.partial(self._tap_readable, pair))

    def _stop_receiving(self, pair: int) -> None:
        if pair in self._watching:
            self._watching.discard(pair)
            self._unwatch(self._taps[pair].fd)

    def _tap_readable(self, pair: int) -> None:
        """The event loop's handler: receive under the device's lock and guest-error guard."""
        self.guard.run(functools.partial(self._receive, pair))

    def _receive(self, pair: int) -> None:
        with self.guard.lock:
            try:
                self._receive_batch(pair)
            except GuestError:
                # The tap stays readable and epoll is level-triggered: stop watching it until
                # the driver resets the device, or the event loop would spin on the error.
                self._stop_receiving(pair)
                raise

    def _receive_batch(self, pair: int) -> None:
        mem, interrupt = self._mem, self._interrupt
        if mem is None or interrupt is None:
            return
        queue, tap = self._queues[2 * pair], self._taps[pair]
        receive = self._receive_merged if self._acked & F_MRG_RXBUF else self._receive_whole
        before = self.packets_in
        for _ in range(BATCH):
            if not queue.has_work(mem):
                self._stop_receiving(pair)  # no buffers: wait for the guest's next RX kick
                break
            if self.rx_throttle is not None and self.rx_throttle.blocked(self._retry_receive):
                self._stop_receiving(pair)  # the tap stays readable: unwatched until the timer
                break
            if not receive(pair, queue, mem, tap):
                break
        if self.packets_in != before and queue.needs_interrupt(mem):
            interrupt(2 * pair)

    def _receive_whole(self, pair: int, queue: SplitQueue, mem: GuestMemory, tap: Tap) -> bool:
        """One packet into one chain (the driver posts chains as large as any packet)."""
        chain = queue.pop(mem)
        assert chain is not None  # has_work said so, under the lock
        room = _receive_room(chain)
        length = self._read(pair, queue, tap, chain.writable)
        if length is None:
            return False
        _store_at(chain.writable, NUM_BUFFERS_OFFSET, b"\1\0")
        queue.push(mem, chain.head, min(length, room))
        self._received(length)
        return True

    def _receive_merged(self, pair: int, queue: SplitQueue, mem: GuestMemory, tap: Tap) -> bool:
        """One packet into as many chains as it needs (VIRTIO_NET_F_MRG_RXBUF), all returned
        under one used index with their number in the header. With too few buffers posted the
        packet is dropped, as a NIC drops on an empty ring, and receiving waits for the
        driver's next kick (which posting buffers past the ones taken brings)."""
        first = queue.pop(mem)
        assert first is not None  # has_work said so, under the lock
        room = _receive_room(first)
        length = self._read(pair, queue, tap, [*first.writable, self._bounce])
        if length is None:
            return False
        used = [(first.head, min(length, room))]
        if length > room and not self._spill(queue, mem, self._bounce[: length - room], used):
            queue.unpop(len(used))
            self.dropped += 1
            self._stop_receiving(pair)
            return False
        _store_at(first.writable, NUM_BUFFERS_OFFSET, len(used).to_bytes(2, "little"))
        queue.push_many(mem, used)
        self._received(length)
        return True

    @staticmethod
    def _spill(queue: SplitQueue, mem: GuestMemory, data: memoryview, used: list[tuple[int, int]]) -> bool:
        """Copy ``data`` into the next chains, adding each to ``used``; False if they run out
        (every chain taken is in ``used``, to be given back)."""
        while data:
            chain = queue.pop(mem)
            if chain is None:
                return False
            if len(chain.writable) > MAX_BUFFERS:
                parts = len(chain.writable)
                raise GuestError(f"virtio-net receive buffer of {parts} parts (at most {MAX_BUFFERS})")
            written = _scatter(data, chain.writable)
            used.append((chain.head, written))
            data = data[written:]
        return True

    def _read(self, pair: int, queue: SplitQueue, tap: Tap, buffers: list[memoryview]) -> int | None:
        """A packet from the tap into ``buffers``; None (the chain given back) if none waits
        or the host's side failed."""
        try:
            return os.readv(tap.fd, buffers)
        except BlockingIOError:
            queue.unpop()
        except OSError as error:  # the host's side: keep the buffers, wait for the next kick
            queue.unpop()
            self.errors += 1
            message = "virtio-net: reading tap %s failed: %s"
            guest_log.warning(log, ("virtio-net-rx", id(self)), message, tap.fd, error.strerror)
            self._stop_receiving(pair)
        return None

    def _received(self, length: int) -> None:
        self.packets_in += 1
        if self.rx_throttle is not None:
            self.rx_throttle.spend(length)

    def _retry_receive(self) -> None:
        """The receive throttle's timer: watch the taps again (under the lock)."""
        with self.guard.lock:
            for pair in range(self._active):
                self._start_receiving(pair)

    # --- transmit: guest -> tap -----------------------------------------------------------
    def _tx_throttled(self, queue: SplitQueue, mem: GuestMemory) -> bool:
        """Packets wait and we are over the transmit limit: the queue waits for the timer."""
        throttle = self.tx_throttle
        return throttle is not None and queue.has_work(mem) and throttle.blocked(self._retry_transmit)

    def _retry_transmit(self) -> None:
        for pair in range(self.queue_pairs):
            self.guard.run(functools.partial(self._transmit, pair))

    def _transmit(self, pair: int) -> None:
        with self.guard.lock:
            mem, interrupt = self._mem, self._interrupt
            if mem is None or interrupt is None:
                return
            queue, fd = self._queues[2 * pair + TX], self._taps[pair].fd
            sent = 0
            throttle = self.tx_throttle
            while not self._tx_throttled(queue, mem) and (chain := queue.pop(mem)) is not None:
                try:
                    os.writev(fd, chain.readable)
                    self.packets_out += 1
                except OSError:
                    self.dropped += 1  # a full tap or a malformed packet: dropped, as on a wire
                if throttle is not None:
                    throttle.spend(chain.readable_length)
                queue.push(mem, chain.head, 0)
                sent += 1
            if sent and queue.needs_interrupt(mem):
                interrupt(2 * pair + TX)


def _receive_room(chain: DescriptorChain) -> int:
    """The room of a receive chain, which must hold the header and fit one readv."""
    room = chain.writable_length
    if room < VNET_HEADER_SIZE or len(chain.writable) > MAX_BUFFERS:
        raise GuestError(
            f"virtio-net receive chain of {len(chain.writable)} buffers, {room} bytes"
            f" (needs the {VNET_HEADER_SIZE}-byte header, at most {MAX_BUFFERS} buffers)"
        )
    return room


def _scatter(data: memoryview, buffers: list[memoryview]) -> int:
    """Copy the start of ``data`` into ``buffers`` in order; returns how much fitted."""
    done = 0
    for buffer in buffers:
        count = min(len(buffer), len(data) - done)
        buffer[:count] = data[done : done + count]
        done += count
        if done == len(data):
            break
    return done


def _store_at(buffers: list[memoryview], offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` of the byte stream ``buffers`` make (a field may straddle two)."""
    for buffer in buffers:
        if offset >= len(buffer):
            offset -= len(buffer)
            continue
        count = min(len(buffer) - offset, len(data))
        buffer[offset : offset + count] = data[:count]
        data, offset = data[count:], 0
        if not data:
            return


def _gather(buffers: list[memoryview], limit: int) -> bytes:
    """The first ``limit`` bytes of the byte stream ``buffers`` make (never more: the guest
    chooses the buffers' lengths)."""
    parts, left = [], limit
    for buffer in buffers:
        if left <= 0:
            break
        parts.append(bytes(buffer[:left]))
        left -= len(parts[-1])
    return b"".join(parts)


__all__ = ["NetState", "VirtioNet", "parse_mac", "tap_offloads"]
