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
from kvmpy.eventfd import drain
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.device import F_VERSION_1, Interrupt
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import DescriptorChain, SplitQueue
from kvmpy.virtio.vhost.rings import Irqfds, Rings, Unwatch, Watch
from kvmpy.virtio.vhost.user_client import VhostUserClient, VhostUserError

log = logging.getLogger("kvmpy.virtio")


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
        self.features, self._config = self._handshake(client)
        self._rings = Rings(watch, unwatch)
        self._mem: GuestMemory | None = None
        self._queues: list[SplitQueue] = []
        self._interrupt: Interrupt | None = None
        self._acked = 0
        #: Requests kvmpy completed itself after the back end was lost.
        self.failed_requests = 0
        self.lost: str | None = None
        watch(client.fileno(), self._socket_readable)

    def _handshake(self, client: VhostUserClient) -> tuple[int, bytes]:
        """Features, protocol features and ownership; returns what the guest is offered and
        the configuration space."""
        backend_features = client.get_u64(vu.GET_FEATURES)
        if not backend_features & F_VERSION_1:
            raise VhostUserError(f"vhost-user back end {client.name} does not offer VIRTIO_F_VERSION_1")
        speaks = bool(backend_features & vu.F_PROTOCOL_FEATURES)
        agreed = client.negotiate_protocol(self.wanted_protocol) if speaks else 0
        client.tell(vu.SET_OWNER)
        self.features = backend_features & self.passed_features  # configure() may read it
        return self.features, self.configure(client, agreed)

    def reconnect(self, client: VhostUserClient) -> None:
        """A restarted back end takes over again, from where kvmpy's failing left the rings.

        While the back end was gone kvmpy completed every request itself, so the rings'
        positions are kvmpy's and exact: the new back end starts from them. It must offer
        the guest what the old one did (the driver negotiated with that); raises
        VhostUserError otherwise, and the device goes on failing requests.
        """
        with self.guard.lock:
            if self.lost is None:
                raise VhostUserError(f"{self.name} still has its vhost-user back end")
            saved = (self.features, self._config, self.queue_sizes)
            features, config = self._handshake(client)
            if (features, config, self.queue_sizes) != saved:
                self.features, self._config, self.queue_sizes = saved
                raise VhostUserError(
                    f"vhost-user back end {client.name} is not the device {self.name} was (features"
                    f" {features:#x}, configuration or queues differ): the guest negotiated with that"
                )
            for fd in self._rings.kicks.values():
                self._unwatch(fd)  # the back end waits on them again
            self._client, self.lost = client, None
            self._watch(client.fileno(), self._socket_readable)
            log.warning("%s: vhost-user back end %s connected again", self.name, client.name)
            mem, queues, interrupt = self._mem, self._queues, self._interrupt
            if mem is not None and interrupt is not None:
                self._send(lambda client: self._hand_over(client, mem, queues, self._acked, interrupt))
                for fd in self._rings.kicks.values():
                    os.eventfd_write(fd, 1)  # the back end looks once at what is already available

    def configure(self, client: VhostUserClient, protocol: int) -> bytes:
        """Set ``queue_sizes`` (and features) from the back end; returns the configuration space."""
        raise NotImplementedError

    def fail_request(self, chain: DescriptorChain) -> int:
        """Complete ``chain`` with an error once the back end is gone; returns bytes written."""
        raise NotImplementedError

    # --- wiring from the PCI platform and the transport -------------------------------------
    def bind_irqfds(self, irqfds: Irqfds) -> None:
        """How to find the irqfd of a queue's MSI-X vector (the transport knows the vectors)."""
        self._rings.irqfds = irqfds

    def kicks_wired(self, kicks: dict[int, int]) -> None:
        """The ioeventfds at the queues' notify addresses (the BAR moved, or was mapped)."""
        with self.guard.lock:
            if self.lost is not None:
                for fd in self._rings.kicks.values():
                    self._unwatch(fd)
            self._rings.kicks = dict(kicks)
            if self.lost is not None:
                self._watch_kicks()
                return
            self._send(lambda client: self._rings.rewire_kicks(client))

    def interrupts_changed(self) -> None:
        """A vector was masked or unmasked (MSI-X table or control word)."""
        with self.guard.lock:
            self._send(self._rings.rewire_calls)

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
            self._acked = acked_features
            if self.lost is not None:
                self._serve_failing()
                return
            self._send(lambda client: self._hand_over(client, mem, queues, acked_features, interrupt))

    def queue_notify(self, index: int) -> None:
        """A kick that exited instead of reaching the ioeventfd: pass it on."""
        with self.guard.lock:
            if self.lost is not None:
                self._serve_failing()
            elif index in self._rings.kicks:
                os.eventfd_write(self._rings.kicks[index], 1)

    def reset(self) -> None:
        """The driver reset the device: stop every ring (the back end lets go of guest memory)."""
        with self.guard.lock:
            self._send(self._rings.stop)
            self._rings.forget()
            self._mem, self._queues, self._interrupt = None, [], None

    def _hand_over(
        self, client: VhostUserClient, mem: GuestMemory, queues: list[SplitQueue], acked: int,
        interrupt: Interrupt,
    ) -> None:  # fmt: skip
        client.set_features(acked)
        client.set_mem_table(mem.regions)
        self._rings.hand_over(client, mem, queues, interrupt)

    # --- losing the back end ------------------------------------------------------------------
    def _send(self, work: Callable[[VhostUserClient], object]) -> None:
        """Talk to the back end; if that fails, the back end is lost (lock held)."""
        if self._client is None:
            return
        try:
            work(self._client)
        except VhostUserError as error:
            self._lose(str(error))

    def _socket_readable(self) -> None:
        """The back end never writes unasked: between requests (they all run under the
        device's lock) its socket turns readable only when it closes."""
        with self.guard.lock:
            client = self._client
            why = client.hung_up() if client is not None else None
            if client is not None and why is not None:
                self._lose(f"vhost-user back end {client.name}: {why}")

    def _lose(self, why: str) -> None:
        """Take the rings back and fail what they hold, from now on in Python (lock held)."""
        self.lost = why
        log.error("%s: %s; its requests now fail with I/O errors", self.name, why)
        client, self._client = self._client, None
        if client is not None:
            self._unwatch(client.fileno())
            client.close()
        self._rings.forget()
        mem = self._mem
        if mem is not None:
            for queue in self._queues:
                if queue.ready:
                    self.guard.run(functools.partial(queue.take_over, mem))
        self._watch_kicks()
        self._serve_failing()

    def _watch_kicks(self) -> None:
        for fd in self._rings.kicks.values():
            self._watch(fd, functools.partial(self._kicked_after_loss, fd))

    def _kicked_after_loss(self, fd: int) -> None:
        drain(fd)
        self.guard.run(functools.partial(self._serve_kick, fd))

    def _serve_kick(self, fd: int) -> None:
        """A kick drained while the back end was gone (lock held). If a new back end took
        the rings over meanwhile, the kick is its: pass it on, or its request would wait
        for the guest's next kick, which may never come."""
        if self.lost is None:
            os.eventfd_write(fd, 1)
        else:
            self._serve_failing()

    def _serve_failing(self) -> None:
        """Complete every available request with the device's error (lock held)."""
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
            self._rings.close_relays()
            for fd in self._rings.kicks.values():
                self._unwatch(fd)
            if self._client is not None:
                self._unwatch(self._client.fileno())
                self._client.close()
                self._client = None


__all__ = ["Irqfds", "Unwatch", "VhostUserDevice", "Watch"]
