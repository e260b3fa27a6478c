"""virtio-net (virtio 1.x, 5.1) on a tap device.

Packets cross with their virtio-net header: the tap speaks the same header
(IFF_VNET_HDR), so checksum and segmentation offloads pass straight through
and packet data moves with ``os.readv``/``os.writev`` between the tap and
memoryviews of guest buffers, no copies. Receive is driven by the tap
becoming readable (watched only while the guest has posted buffers),
transmit by the guest's kick on the transmit queue.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from kvmpy.abi import tun
from kvmpy.errors import ConfigError, GuestError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.ratelimit import guest_log
from kvmpy.virtio.device import COMMON_FEATURES, TYPE_NET, Interrupt
from kvmpy.virtio.devices.tap import VNET_HEADER_SIZE, Tap
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import SplitQueue
from kvmpy.virtio.throttle import Throttle

log = logging.getLogger("kvmpy.virtio")

F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7
F_GUEST_TSO6 = 1 << 8
F_HOST_TSO4 = 1 << 11
F_HOST_TSO6 = 1 << 12
F_STATUS = 1 << 16
LINK_UP = 1
RX, TX = 0, 1
#: Packets handled per wake-up before yielding to other devices.
BATCH = 64
#: readv/writev take at most IOV_MAX (1024) buffers; a longer chain is the guest's error.
MAX_BUFFERS = 1024


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
    """The configuration the guest read (MAC, link status). Offloads are the acknowledged
    features, set on the tap again when the transport reactivates the device; no packet is
    held between the tap and the rings, so nothing else is pending."""

    config: bytes


class VirtioNet:
    device_type = TYPE_NET
    queue_sizes: tuple[int, ...] = (256, 256)
    features = (
        COMMON_FEATURES | F_MAC | F_STATUS | F_CSUM | F_GUEST_CSUM
        | F_HOST_TSO4 | F_HOST_TSO6 | F_GUEST_TSO4 | F_GUEST_TSO6
    )  # fmt: skip

    def __init__(
        self,
        tap: Tap,
        mac: bytes,
        watch: Callable[[int, Callable[[], None]], None],
        unwatch: Callable[[int], None],
        *,
        rx_throttle: Throttle | None = None,
        tx_throttle: Throttle | None = None,
    ) -> None:
        self._tap = tap
        self._config = mac + struct.pack("<HH", LINK_UP, 1)
        self._watch, self._unwatch = watch, unwatch
        self.guard = DeviceGuard()
        #: Rate limiters of each direction (bytes and packets); None: unlimited.
        self.rx_throttle, self.tx_throttle = rx_throttle, tx_throttle
        self._mem: GuestMemory | None = None
        self._queues: list[SplitQueue] = []
        self._interrupt: Interrupt | None = None
        self._watching = False
        self.packets_in = self.packets_out = self.dropped = 0
        #: Host-side receive failures (the tap read failed for a reason of its own).
        self.errors = 0

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
        return NetState(self._config)

    def restore(self, state: NetState) -> None:
        if state.config != self._config:
            mac = ":".join(f"{byte:02x}" for byte in state.config[:6])
            raise ValueError(f"saved virtio-net configuration (MAC {mac}) is not this interface's")

    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        self._tap.set_offloads(tap_offloads(acked_features))
        with self.guard.lock:
            self._mem, self._queues, self._interrupt = mem, queues, interrupt
            self._start_receiving()

    def reset(self) -> None:
        with self.guard.lock:
            self._mem, self._queues, self._interrupt = None, [], None
            self._stop_receiving()

    def close(self) -> None:
        with self.guard.lock:
            self._stop_receiving()
        self._tap.close()
        for throttle in (self.rx_throttle, self.tx_throttle):
            if throttle is not None:
                throttle.close()

    def queue_notify(self, index: int) -> None:
        with self.guard.lock:
            if index == TX:
                self._transmit()
            elif index == RX:
                self._start_receiving()

    # --- receive: tap -> guest -----------------------------------------------------------
    def _start_receiving(self) -> None:
        if not self._watching and self._mem is not None:
            self._watching = True
            self._watch(self._tap.fd, self._tap_readable)

    def _stop_receiving(self) -> None:
        if self._watching:
            self._watching = False
            self._unwatch(self._tap.fd)

    def _tap_readable(self) -> None:
        """The event loop's handler: receive under the device's lock and guest-error guard."""
        self.guard.run(self._receive)

    def _receive(self) -> None:
        with self.guard.lock:
            try:
                self._receive_batch()
            except GuestError:
                # The tap stays readable and epoll is level-triggered: stop watching it until
                # the driver resets the device, or the event loop would spin on the error.
                self._stop_receiving()
                raise

    def _receive_batch(self) -> None:
        mem, interrupt = self._mem, self._interrupt
        if mem is None or interrupt is None:
            return
        queue = self._queues[RX]
        delivered = 0
        for _ in range(BATCH):
            if not queue.has_work(mem):
                self._stop_receiving()  # no buffers: wait for the guest's next RX kick
                break
            if self.rx_throttle is not None and self.rx_throttle.blocked(self._retry_receive):
                self._stop_receiving()  # the tap stays readable: unwatched until the timer
                break
            chain = queue.pop(mem)
            assert chain is not None  # has_work said so, under the lock
            room = chain.writable_length
            if room < VNET_HEADER_SIZE or len(chain.writable) > MAX_BUFFERS:
                raise GuestError(
                    f"virtio-net receive chain of {len(chain.writable)} buffers, {room} bytes"
                    f" (needs the {VNET_HEADER_SIZE}-byte header, at most {MAX_BUFFERS} buffers)"
                )
            try:
                length = os.readv(self._tap.fd, chain.writable)
            except BlockingIOError:
                queue.unpop()
                break
            except OSError as error:  # the host's side: keep the buffers, wait for the next kick
                queue.unpop()
                self.errors += 1
                message = "virtio-net: reading tap %s failed: %s"
                guest_log.warning(log, ("virtio-net-rx", id(self)), message, self._tap.fd, error.strerror)
                self._stop_receiving()
                break
            queue.push(mem, chain.head, min(length, room))
            if self.rx_throttle is not None:
                self.rx_throttle.spend(length)
            delivered += 1
        self.packets_in += delivered
        if delivered and queue.needs_interrupt(mem):
            interrupt(RX)

    def _retry_receive(self) -> None:
        """The receive throttle's timer: watch the tap again (under the lock)."""
        with self.guard.lock:
            self._start_receiving()

    # --- transmit: guest -> tap -----------------------------------------------------------
    def _tx_throttled(self, queue: SplitQueue, mem: GuestMemory) -> bool:
        """Packets wait and we are over the transmit limit: the queue waits for the timer."""
        throttle = self.tx_throttle
        return throttle is not None and queue.has_work(mem) and throttle.blocked(self._retry_transmit)

    def _retry_transmit(self) -> None:
        self.guard.run(self._transmit)

    def _transmit(self) -> None:
        with self.guard.lock:
            mem, interrupt = self._mem, self._interrupt
            if mem is None or interrupt is None:
                return
            queue = self._queues[TX]
            sent = 0
            throttle = self.tx_throttle
            while not self._tx_throttled(queue, mem) and (chain := queue.pop(mem)) is not None:
                try:
                    os.writev(self._tap.fd, chain.readable)
                    self.packets_out += 1
                except OSError:
                    self.dropped += 1  # a full tap or a malformed packet: dropped, as on a wire
                if throttle is not None:
                    throttle.spend(chain.readable_length)
                queue.push(mem, chain.head, 0)
                sent += 1
            if sent and queue.needs_interrupt(mem):
                interrupt(TX)


__all__ = ["NetState", "VirtioNet", "parse_mac", "tap_offloads"]
