"""virtio-net with its queues in the host kernel (vhost-net): packets never reach Python.

kvmpy keeps the device model the guest negotiates with (MAC, link status, the
offloads, the queue pairs and the control queue, all of
:class:`~kvmpy.virtio.devices.net.VirtioNet`'s) and, at DRIVER_OK, gives one
/dev/vhost-net per queue pair that pair's two rings, guest RAM's layout in kvmpy's
address space, the queues' ioeventfds as kicks, their MSI-X irqfds as calls, and
the pair's tap queue as the back end of both rings. The kernel's vhost workers then
move packets between the tap and guest memory themselves, mergeable receive buffers
included; the tap still adds and strips the virtio-net header (vnet_hdr), as for the
Python back end, so vhost-net's own header feature is not taken. The control queue
stays with kvmpy: turning pairs on and off is attaching and detaching tap queues.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence

from kvmpy.errors import GuestError, HostError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.device import COMMON_FEATURES, Interrupt
from kvmpy.virtio.devices.net import F_MRG_RXBUF, NetState, VirtioNet
from kvmpy.virtio.devices.tap import Tap
from kvmpy.virtio.queue import SplitQueue
from kvmpy.virtio.vhost.kernel import KernelVhost, VhostError
from kvmpy.virtio.vhost.rings import Irqfds, Rings, drain

log = logging.getLogger("kvmpy.virtio")

VHOST_NET = "/dev/vhost-net"


def vhost_net_usable() -> bool:
    """Whether ``vhost=auto`` takes the kernel's data plane: /dev/vhost-net can be opened."""
    return os.access(VHOST_NET, os.R_OK | os.W_OK)


class VhostNet(VirtioNet):
    """The guest-visible virtio-net of :class:`VirtioNet`; the data path is the kernel's."""

    def __init__(
        self,
        taps: Tap | Sequence[Tap],
        mac: bytes,
        watch: Callable[[int, Callable[[], None]], None],
        unwatch: Callable[[int], None],
        vhost_path: str = VHOST_NET,
    ) -> None:
        super().__init__(taps, mac, watch, unwatch)
        self._vhosts: list[KernelVhost] = []
        try:
            for _ in self._taps:
                self._vhosts.append(KernelVhost(vhost_path))
        except BaseException:
            for vhost in self._vhosts:
                vhost.close()
            raise
        # Ring features and mergeable buffers only as far as the kernel serves them; device
        # features are the tap's.
        unserved = (COMMON_FEATURES | F_MRG_RXBUF) & ~self._vhosts[0].features
        self.features &= ~unserved
        #: Each pair's receive and transmit queue, rings 0 and 1 of its own vhost-net.
        pairs = range(self.queue_pairs)
        self._rings = [Rings(watch, unwatch, served=(2 * pair, 2 * pair + 1)) for pair in pairs]
        #: The control queue's ioeventfd, which kvmpy's event loop watches (None: one pair).
        self._control_kick: int | None = None

    # --- wiring from the PCI platform and the transport -------------------------------------
    def bind_irqfds(self, irqfds: Irqfds) -> None:
        for rings in self._rings:
            rings.irqfds = irqfds

    def kicks_wired(self, kicks: dict[int, int]) -> None:
        with self.guard.lock:
            for vhost, rings in zip(self._vhosts, self._rings, strict=True):
                rings.kicks = dict(kicks)
                self._checked(functools.partial(rings.rewire_kicks, vhost))
            self._watch_control(kicks.get(self._control_queue))

    def _watch_control(self, kick: int | None) -> None:
        if self._control_kick is not None:
            self._unwatch(self._control_kick)
        self._control_kick = kick
        if kick is not None:
            self._watch(kick, functools.partial(self._control_kicked, kick))

    def _control_kicked(self, kick: int) -> None:
        drain(kick)
        self.guard.run(self._control)

    def interrupts_changed(self) -> None:
        """A vector was masked or unmasked (MSI-X table or control word)."""
        with self.guard.lock:
            for vhost, rings in zip(self._vhosts, self._rings, strict=True):
                self._checked(functools.partial(rings.rewire_calls, vhost))

    # --- the VirtioDevice interface -----------------------------------------------------------
    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        self._set_offloads(acked_features)
        with self.guard.lock:
            self._mem, self._queues, self._interrupt = mem, queues, interrupt
            self._acked = acked_features
            self._checked(lambda: self._hand_over(mem, queues, acked_features, interrupt))
            self._use_pairs(self._active)

    def _hand_over(
        self, mem: GuestMemory, queues: list[SplitQueue], acked: int, interrupt: Interrupt
    ) -> None:
        for vhost, rings, tap in zip(self._vhosts, self._rings, self._taps, strict=True):
            vhost.set_features(acked & vhost.features)
            vhost.set_mem_table(mem.regions)
            rings.hand_over(vhost, mem, queues, interrupt)
            for index in rings.started:
                vhost.set_net_backend(rings.ring_of(index), tap.fd)

    def _start_receiving(self, pair: int) -> None:
        pass  # the kernel receives: an attached tap queue is all a pair needs

    def _stop_receiving(self, pair: int) -> None:
        pass

    def queue_notify(self, index: int) -> None:
        """A kick that exited instead of reaching the ioeventfd: pass it on to the kernel (or,
        for the control queue, answer it)."""
        with self.guard.lock:
            if index == self._control_queue:
                self._control()
                return
            kick = self._rings[index // 2].kicks.get(index)
            if kick is not None:
                os.eventfd_write(kick, 1)

    def reset(self) -> None:
        with self.guard.lock:
            for vhost, rings in zip(self._vhosts, self._rings, strict=True):
                started = list(rings.started)
                self._checked(functools.partial(self._stop, vhost, rings, started))
                rings.forget()
            self._mem, self._queues, self._interrupt = None, [], None
            self._use_pairs(1)

    @staticmethod
    def _stop(vhost: KernelVhost, rings: Rings, started: list[int]) -> None:
        for index in started:
            vhost.set_net_backend(rings.ring_of(index), None)
        rings.stop(vhost)

    def _checked(self, work: Callable[[], object]) -> None:
        """A vhost ioctl the kernel refused: the rings it was given were not usable (the
        transport checked they are guest RAM), so the device needs a reset (lock held)."""
        try:
            work()
        except VhostError as error:
            raise GuestError(f"vhost-net refused the rings: {error}") from None

    def save(self) -> NetState:
        raise HostError(
            "a vhost-net interface cannot be snapshotted or migrated yet (its ring positions are"
            " the kernel's): use --net tap=IF,vhost=off"
        )

    def close(self) -> None:
        with self.guard.lock:
            for rings in self._rings:
                rings.close_relays()
            self._watch_control(None)
        for vhost in self._vhosts:
            vhost.close()
        for tap in self._taps:
            tap.close()


__all__ = ["VHOST_NET", "VhostNet", "vhost_net_usable"]
