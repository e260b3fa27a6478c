"""A virtio device whose queues a vhost-user back end serves: the part every such device shares.

kvmpy keeps the PCI function, the feature negotiation and the queue set-up
(the transport), and hands each ring to the back end once the driver sets
DRIVER_OK: guest RAM as memfds, ring addresses, the queue's ioeventfd as the
kick and the MSI-X vector's irqfd as the call (or an eventfd kvmpy relays,
while MSI-X is off). From then on a request goes from the guest to the back
end and back without Python.

When the back end dies (its socket closes, or a request to it fails), kvmpy
takes the rings back: the requests it had not completed, and every request
after, are completed by the device class's :meth:`VhostUserDevice.fail_request`
(an I/O error for a disk), so the guest sees errors on that device and
everything else goes on. Which requests were in flight is read from the
rings: the ones between the used index and the available index, which is
exact for a back end that completes in order (qemu-storage-daemon 7.2 does
not offer the in-flight tracking protocol feature that would make it exact
in every case).

A vhost-user device has no snapshot state kvmpy could save: its requests and
ring positions live in the other process (stopping the rings to read them
back is the next step), so a snapshot of such a VM is refused with a message.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable

from kvmpy.abi import vhost_user as vu
from kvmpy.errors import HostError
from kvmpy.memory.guest_memory import GuestMemory, MemoryRegion
from kvmpy.virtio.device import F_VERSION_1, Interrupt
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import DescriptorChain, SplitQueue
from kvmpy.virtio.vhost.user_client import SharedRegion, VhostUserClient, VhostUserError

log = logging.getLogger("kvmpy.virtio")

#: (fd, handler) -> None and fd -> None: the event loop's add and remove.
Watch = Callable[[int, Callable[[], None]], None]
Unwatch = Callable[[int], None]
#: Queue index -> the eventfd KVM turns into that queue's MSI-X interrupt, or None.
Irqfds = Callable[[int], "int | None"]


class VhostUserDevice:
    """The device model the transport sees; the data path is the back end's.

    A subclass names its ``device_type``, the virtio ``passed_features`` it lets through,
    the protocol features it wants, and implements :meth:`configure` (configuration space
    and queues) and :meth:`fail_request`.
    """

    device_type = 0
    passed_features = F_VERSION_1
    wanted_protocol = vu.PROTOCOL_F_REPLY_ACK
    queue_sizes: tuple[int, ...] = ()

    def __init__(self, client: VhostUserClient, name: str, watch: Watch, unwatch: Unwatch) -> None:
        self.guard = DeviceGuard()
        self.name = name
        self._client: VhostUserClient | None = client
        self._watch, self._unwatch = watch, unwatch
        backend_features = client.get_u64(vu.GET_FEATURES)
        if not backend_features & F_VERSION_1:
            raise VhostUserError(f"vhost-user back end {client.name} does not offer VIRTIO_F_VERSION_1")
        self._protocol = bool(backend_features & vu.F_PROTOCOL_FEATURES)
        agreed = client.negotiate_protocol(self.wanted_protocol) if self._protocol else 0
        client.tell(vu.SET_OWNER)
        self.features = backend_features & self.passed_features
        self._config = self.configure(client, agreed)
        self._irqfds: Irqfds = lambda queue: None
        self._kicks: dict[int, int] = {}
        self._relays: dict[int, int] = {}
        self._started: list[int] = []
        self._mem: GuestMemory | None = None
        self._queues: list[SplitQueue] = []
        self._interrupt: Interrupt | None = None
        #: Requests kvmpy completed itself after the back end was lost.
        self.failed_requests = 0
        self.lost: str | None = None
        watch(client.fileno(), self._socket_readable)

    def configure(self, client: VhostUserClient, protocol: int) -> bytes:
        """Set ``queue_sizes`` (and features) from the back end; returns the configuration space."""
        raise NotImplementedError

    def fail_request(self, chain: DescriptorChain) -> int:
        """Complete ``chain`` with an error once the back end is gone; returns bytes written."""
        raise NotImplementedError

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
        pass  # nothing writable is offered

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
                queue.push(mem, chain.head, self.fail_request(chain))
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
            f"{self.name} is a vhost-user device: its requests live in another process, and kvmpy"
            " cannot snapshot or migrate it yet"
        )

    def restore(self, state: object) -> None:
        raise HostError(f"{self.name} is a vhost-user device: it cannot be restored from a snapshot")

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


__all__ = ["Irqfds", "Unwatch", "VhostUserDevice", "Watch"]
