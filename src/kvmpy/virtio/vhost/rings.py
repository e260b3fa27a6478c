"""Handing a device's virtqueues to a back end outside Python, whichever kind it is.

A vhost back end, in the kernel (/dev/vhost-net: ioctls) or in another process
(vhost-user: messages on a socket), takes the same steps for each ring: its size,
where its three parts lie in the VMM's address space, the index to start from,
the eventfd that signals a kick (the queue's ioeventfd), and the eventfd to
signal when it used buffers (the MSI-X vector's irqfd, so the interrupt goes
from the back end to KVM without Python; or, while MSI-X is off or the vector
is masked, an eventfd kvmpy relays to the transport, which sets the vector's
pending bit or raises INTx as for its own devices). :class:`Rings` does those steps over a
:class:`RingBackend`, and keeps what it handed over, to do it again or undo it.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Protocol

from kvmpy.eventfd import drain
from kvmpy.memory.guest_memory import GuestMemory, MemoryRegion
from kvmpy.virtio.device import Interrupt
from kvmpy.virtio.queue import SplitQueue

#: (fd, handler) -> None and fd -> None: the event loop's add and remove.
Watch = Callable[[int, Callable[[], None]], None]
Unwatch = Callable[[int], None]
#: Queue index -> the eventfd KVM turns into that queue's MSI-X interrupt, or None.
Irqfds = Callable[[int], "int | None"]


class RingBackend(Protocol):
    """What a back end is told, ring by ring (vhost-user messages or kernel vhost ioctls)."""

    def set_features(self, features: int) -> None: ...

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None: ...

    def set_vring_num(self, index: int, size: int) -> None: ...

    def set_vring_addr(self, index: int, descriptors: int, used: int, available: int) -> None: ...

    def set_vring_base(self, index: int, base: int) -> None: ...

    def set_vring_kick(self, index: int, fd: int | None) -> None: ...

    def set_vring_call(self, index: int, fd: int) -> None: ...

    def enable_vring(self, index: int) -> None: ...

    def get_vring_base(self, index: int) -> int:
        """Stop the ring; where the back end stopped (its next available index)."""
        ...


class Rings:
    """The rings of one device as a back end has them (all methods under the device's lock)."""

    def __init__(self, watch: Watch, unwatch: Unwatch, served: Sequence[int] | None = None) -> None:
        self._watch, self._unwatch = watch, unwatch
        #: The device's queues this back end serves, in the order of its own ring numbers
        #: (a vhost-net device serves one receive and transmit pair); None: all, numbered alike.
        self._served = tuple(served) if served is not None else None
        self.irqfds: Irqfds = lambda queue: None
        #: Queue index -> the ioeventfd at its notify address (from the PCI platform).
        self.kicks: dict[int, int] = {}
        #: Queues (the device's numbers) the back end serves now.
        self.started: list[int] = []
        self._relays: dict[int, int] = {}
        self._interrupt: Interrupt | None = None

    def hand_over(
        self, backend: RingBackend, mem: GuestMemory, queues: list[SplitQueue], interrupt: Interrupt
    ) -> None:
        """Every ready queue to ``backend`` (features and memory table already sent)."""
        self._interrupt = interrupt
        for index in range(len(queues)) if self._served is None else self._served:
            queue, ring = queues[index], self.ring_of(index)
            if not queue.ready:
                continue
            backend.set_vring_num(ring, queue.size)
            backend.set_vring_addr(
                ring, host_address(mem, queue.desc_addr), host_address(mem, queue.device_addr),
                host_address(mem, queue.driver_addr),
            )  # fmt: skip
            backend.set_vring_base(ring, queue.last_avail_idx)
            # The call before the kick: a back end starts the ring when it gets the kick, and a
            # kick already pending then (the guest's, while the ring had no back end) makes it
            # complete a request and signal at once (qemu-storage-daemon panics without a call).
            backend.set_vring_call(ring, self._call_fd(index))
            backend.set_vring_kick(ring, self.kicks.get(index))
            backend.enable_vring(ring)
            self.started.append(index)

    def ring_of(self, queue: int) -> int:
        """The back end's number for the device's queue ``queue``."""
        return queue if self._served is None else self._served.index(queue)

    def rewire_kicks(self, backend: RingBackend) -> None:
        """The notify addresses moved: the started rings get the new ioeventfds."""
        for index in self.started:
            backend.set_vring_kick(self.ring_of(index), self.kicks.get(index))

    def rewire_calls(self, backend: RingBackend) -> None:
        """A vector was masked or unmasked: each started ring signals its irqfd only while the
        vector is deliverable, and the relay (which leaves a masked vector pending) otherwise."""
        for index in self.started:
            backend.set_vring_call(self.ring_of(index), self._call_fd(index))

    def stop(self, backend: RingBackend | None) -> dict[int, int]:
        """Take every ring back; returns where each stopped (none if the back end is gone)."""
        started, self.started = self.started, []
        bases = {index: backend.get_vring_base(self.ring_of(index)) for index in started} if backend else {}
        self.close_relays()
        self._interrupt = None
        return bases

    def take_back(self, backend: RingBackend, mem: GuestMemory, queues: list[SplitQueue]) -> None:
        """Stop every ring and bring the device's queues to where the back end left them, so
        kvmpy (a snapshot, its own data plane) goes on from there."""
        for index, base in self.stop(backend).items():
            queues[index].continue_from(mem, base)

    def forget(self) -> None:
        """The back end is gone: nothing to stop, only the relays to close."""
        self.started = []
        self.close_relays()

    def _call_fd(self, index: int) -> int:
        irqfd = self.irqfds(index)
        if irqfd is not None:
            return irqfd
        relay = self._relays.get(index)
        if relay is None:
            relay = self._relays[index] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._watch(relay, functools.partial(self._relayed, index, relay))
        return relay

    def _relayed(self, index: int, relay: int) -> None:
        drain(relay)
        interrupt = self._interrupt
        if interrupt is not None:
            interrupt(index)

    def close_relays(self) -> None:
        for relay in self._relays.values():
            self._unwatch(relay)
            os.close(relay)
        self._relays = {}


def host_address(mem: GuestMemory, gpa: int) -> int:
    """The address of guest-physical ``gpa`` in kvmpy's address space (the transport checked
    that every ring lies in RAM when the driver enabled the queue)."""
    for region in mem:
        if region.gpa <= gpa < region.end:
            return region.host_address() + gpa - region.gpa
    raise ValueError(f"ring address {gpa:#x} is not guest RAM")


__all__ = ["Irqfds", "RingBackend", "Rings", "Unwatch", "Watch", "host_address"]
