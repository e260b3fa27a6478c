"""vhost-user-blk: a virtio-blk whose requests a back-end process serves (qemu-storage-daemon).

kvmpy keeps the PCI function, the feature negotiation and the queue set-up
(the transport), and hands each ring to the back end once the driver sets
DRIVER_OK: guest RAM as memfds, ring addresses, the queue's ioeventfd as the
kick and the MSI-X vector's irqfd as the call. From then on a request goes
from the guest to the daemon and back without Python.

When the back end dies (its socket closes, or a request to it fails), kvmpy
takes the rings back: the requests it had not completed and every request
after complete with VIRTIO_BLK_S_IOERR, so the guest sees I/O errors on that
disk and everything else goes on. Which requests were in flight is read from
the rings: the ones between the used index and the available index, which is
exact for a back end that completes in order (qemu-storage-daemon 7.2 does
not offer the in-flight tracking protocol feature that would make it exact
in every case).
"""

from __future__ import annotations

import functools
import logging
import os
import struct
from collections.abc import Callable

from kvmpy.abi import vhost_user as vu
from kvmpy.errors import HostError
from kvmpy.memory.guest_memory import GuestMemory, MemoryRegion
from kvmpy.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, TYPE_BLOCK, Interrupt
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import SplitQueue
from kvmpy.virtio.vhost.user_client import SharedRegion, VhostUserClient, VhostUserError

log = logging.getLogger("kvmpy.virtio")

# virtio-blk feature bits kvmpy passes through from the back end (virtio 1.x, 5.2.3).
F_SIZE_MAX, F_SEG_MAX, F_GEOMETRY, F_RO, F_BLK_SIZE = 1 << 1, 1 << 2, 1 << 4, 1 << 5, 1 << 6
F_FLUSH, F_TOPOLOGY, F_MQ, F_DISCARD, F_WRITE_ZEROES = 1 << 9, 1 << 10, 1 << 12, 1 << 13, 1 << 14
PASSED_FEATURES = (
    F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX | F_SIZE_MAX | F_SEG_MAX | F_GEOMETRY | F_RO
    | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY | F_MQ | F_DISCARD | F_WRITE_ZEROES
)  # fmt: skip
#: The protocol features kvmpy uses when the back end has them.
WANTED_PROTOCOL = vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK | vu.PROTOCOL_F_CONFIG
CONFIG_SIZE = 60  # through the write-zeroes limits
QUEUE_SIZE = 256
MAX_QUEUES = 16
S_IOERR = 1

#: (fd, handler) -> None and fd -> None: the event loop's add and remove.
Watch = Callable[[int, Callable[[], None]], None]
Unwatch = Callable[[int], None]
#: Queue index -> the eventfd KVM turns into that queue's MSI-X interrupt, or None.
Irqfds = Callable[[int], "int | None"]


class VhostUserBlock:
    """The device model the transport sees; the data path is the back end's."""

    device_type = TYPE_BLOCK

    def __init__(self, client: VhostUserClient, name: str, watch: Watch, unwatch: Unwatch) -> None:
        self.guard = DeviceGuard()
        self.name = name
        self._client: VhostUserClient | None = client
        self._watch, self._unwatch = watch, unwatch
        backend_features = client.get_u64(vu.GET_FEATURES)
        if not backend_features & F_VERSION_1:
            raise VhostUserError(f"vhost-user back end {client.name} does not offer VIRTIO_F_VERSION_1")
        self._protocol = bool(backend_features & vu.F_PROTOCOL_FEATURES)
        agreed = client.negotiate_protocol(WANTED_PROTOCOL) if self._protocol else 0
        if not agreed & vu.PROTOCOL_F_CONFIG:
            raise VhostUserError(
                f"vhost-user back end {client.name} cannot report the disk's configuration (CONFIG)"
            )
        client.tell(vu.SET_OWNER)
        self.features = backend_features & PASSED_FEATURES
        self._config = client.get_config(CONFIG_SIZE)
        self.capacity = struct.unpack_from("<Q", self._config)[0]
        queues = 1
        if self.features & F_MQ:
            queues = struct.unpack_from("<H", self._config, 34)[0]
            if agreed & vu.PROTOCOL_F_MQ:
                queues = min(queues, client.get_u64(vu.GET_QUEUE_NUM))
            if not 1 <= queues <= MAX_QUEUES:
                raise VhostUserError(f"vhost-user back end {client.name} offers {queues} queues")
        self.queue_sizes = (QUEUE_SIZE,) * queues
        self._irqfds: Irqfds = lambda queue: None
        self._kicks: dict[int, int] = {}
        self._relays: dict[int, int] = {}
        self._started: list[int] = []
        self._mem: GuestMemory | None = None
        self._queues: list[SplitQueue] = []
        self._interrupt: Interrupt | None = None
        #: Requests kvmpy completed with an I/O error after the back end was lost.
        self.failed_requests = 0
        self.lost: str | None = None
        watch(client.fileno(), self._socket_readable)

    # --- wiring from the PCI platform and the transport -------------------------------------
    def bind_irqfds(self, irqfds: Irqfds) -> None:
        """How to find the irqfd of a queue's MSI-X vector (the transport knows the vectors)."""
        self._irqfds = irqfds

    def kicks_wired(self, kicks: dict[int, int]) -> None:
        """The ioeventfds at the queues' notify addresses (the BAR moved, or was mapped)."""
        with self.guard.lock:
            if self.lost is not None:
                for fd in self._kicks.values():
                    self._unwatch(fd)
            self._kicks = dict(kicks)
            if self.lost is not None:
                self._watch_kicks()
                return
            for index in self._started:
                self._send(functools.partial(self._set_kick, index))

    # --- the VirtioDevice interface -----------------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        return self._config[offset : offset + size]

    def write_config(self, offset: int, data: bytes) -> None:
        pass  # nothing writable is offered (no CONFIG_WCE)

    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        with self.guard.lock:
            self._mem, self._queues, self._interrupt = mem, queues, interrupt
            if self.lost is not None:
                self._serve_failing()
                return
            self._send(lambda: self._hand_over(mem, queues, acked_features))

    def queue_notify(self, index: int) -> None:
        """A kick that exited instead of reaching the ioeventfd: pass it on."""
        with self.guard.lock:
            if self.lost is not None:
                self._serve_failing()
            elif index in self._kicks:
                os.eventfd_write(self._kicks[index], 1)

    def reset(self) -> None:
        """The driver reset the device: stop every ring (the back end lets go of guest memory)."""
        with self.guard.lock:
            started, self._started = self._started, []
            for index in started:
                self._send(functools.partial(self._stop_ring, index))
            self._close_relays()
            self._mem, self._queues, self._interrupt = None, [], None

    # --- handing the rings over -------------------------------------------------------------
    def _hand_over(self, mem: GuestMemory, queues: list[SplitQueue], acked: int) -> None:
        client = self._client_or_raise()
        client.tell(vu.SET_FEATURES, vu.U64.pack(acked | (vu.F_PROTOCOL_FEATURES if self._protocol else 0)))
        client.set_mem_table([_shared(region) for region in mem])
        for index, queue in enumerate(queues):
            if not queue.ready:
                continue
            client.set_vring(vu.SET_VRING_NUM, index, queue.size)
            client.set_vring_addr(
                index, _hva(mem, queue.desc_addr), _hva(mem, queue.device_addr), _hva(mem, queue.driver_addr)
            )
            client.set_vring(vu.SET_VRING_BASE, index, queue.last_avail_idx)
            self._set_kick(index)
            client.set_vring_fd(vu.SET_VRING_CALL, index, self._call_fd(index))
            if self._protocol:
                client.set_vring(vu.SET_VRING_ENABLE, index, 1)
            self._started.append(index)

    def _stop_ring(self, index: int) -> None:
        self._client_or_raise().get_vring_base(index)

    def _set_kick(self, index: int) -> None:
        self._client_or_raise().set_vring_fd(vu.SET_VRING_KICK, index, self._kicks.get(index))

    def _call_fd(self, index: int) -> int:
        """The queue's irqfd (the interrupt never reaches Python), or an eventfd kvmpy relays to
        the transport (INTx, no vector yet)."""
        irqfd = self._irqfds(index)
        if irqfd is not None:
            return irqfd
        relay = self._relays.get(index)
        if relay is None:
            relay = self._relays[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._watch(relay, lambda: self._relayed(index, relay))
        return relay

    def _relayed(self, index: int, relay: int) -> None:
        _drain(relay)
        interrupt = self._interrupt
        if interrupt is not None:
            interrupt(index)

    def _close_relays(self) -> None:
        for relay in self._relays.values():
            self._unwatch(relay)
            os.close(relay)
        self._relays = {}

    # --- losing the back end ------------------------------------------------------------------
    def _client_or_raise(self) -> VhostUserClient:
        if self._client is None:
            raise VhostUserError(f"vhost-user back end of {self.name} is gone")
        return self._client

    def _send(self, work: Callable[[], object]) -> None:
        """Talk to the back end; if that fails, the back end is lost (lock held)."""
        try:
            work()
        except VhostUserError as error:
            self._lose(str(error))

    def _socket_readable(self) -> None:
        """The back end never writes unasked: between requests (they all run under the
        device's lock) its socket turns readable only when it closes."""
        with self.guard.lock:
            client = self._client
            why = client.hung_up() if client is not None else None
            if why is not None:
                self._lose(f"vhost-user back end {client.name if client else ''}: {why}")

    def _lose(self, why: str) -> None:
        """Take the rings back and fail what they hold, from now on in Python (lock held)."""
        self.lost = why
        log.error("%s: %s; its requests now fail with I/O errors", self.name, why)
        client, self._client = self._client, None
        if client is not None:
            self._unwatch(client.fileno())
            client.close()
        self._started = []
        self._close_relays()
        mem = self._mem
        if mem is not None:
            for queue in self._queues:
                if queue.ready:
                    self.guard.run(functools.partial(queue.take_over, mem))
        self._watch_kicks()
        self._serve_failing()

    def _watch_kicks(self) -> None:
        for fd in self._kicks.values():
            self._watch(fd, functools.partial(self._kicked_after_loss, fd))

    def _kicked_after_loss(self, fd: int) -> None:
        _drain(fd)
        self.guard.run(self._serve_failing)

    def _serve_failing(self) -> None:
        """Complete every available request with VIRTIO_BLK_S_IOERR (lock held)."""
        mem, interrupt = self._mem, self._interrupt
        if mem is None or interrupt is None:
            return
        for index, queue in enumerate(self._queues):
            done = False
            while (chain := queue.pop(mem)) is not None:
                written = 0
                if chain.writable and len(chain.writable[-1]) >= 1:
                    chain.writable[-1][-1] = S_IOERR
                    written = 1
                queue.push(mem, chain.head, written)
                self.failed_requests += 1
                done = True
            if done and queue.needs_interrupt(mem):
                interrupt(index)

    # --- state ------------------------------------------------------------------------------
    @property
    def state_type(self) -> type[object]:
        return object

    def save(self) -> object:
        raise HostError(
            f"{self.name} is a vhost-user disk: its requests live in another process, and kvmpy"
            " cannot snapshot or migrate it yet"
        )

    def restore(self, state: object) -> None:
        raise HostError(f"{self.name} is a vhost-user disk: it cannot be restored from a snapshot")

    def close(self) -> None:
        with self.guard.lock:
            self._close_relays()
            for fd in self._kicks.values():
                self._unwatch(fd)
            if self._client is not None:
                self._unwatch(self._client.fileno())
                self._client.close()
                self._client = None


def _shared(region: MemoryRegion) -> SharedRegion:
    if region.fd < 0:
        raise VhostUserError("guest RAM is not shared memory: vhost-user needs it as memfds")
    return SharedRegion(region.gpa, region.size, region.host_address(), region.fd)


def _drain(fd: int) -> None:
    try:
        os.eventfd_read(fd)
    except BlockingIOError:
        pass


def _hva(mem: GuestMemory, gpa: int) -> int:
    """The address of guest-physical ``gpa`` in kvmpy's address space (the transport checked
    that every ring lies in RAM when the driver enabled the queue)."""
    for region in mem:
        if region.gpa <= gpa < region.end:
            return region.host_address() + gpa - region.gpa
    raise VhostUserError(f"ring address {gpa:#x} is not guest RAM")


__all__ = ["VhostUserBlock"]
