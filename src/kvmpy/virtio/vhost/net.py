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

The rings' positions are the kernel's while it runs them, so a pause takes them back
(and a snapshot saves them as kvmpy's own), and while pages are tracked for a live
migration kvmpy serves the queues with the Python back end it inherits: the kernel's
writes to guest memory would be in no dirty log.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence

from kvmpy.errors import GuestError
from kvmpy.eventfd import drain
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.device import COMMON_FEATURES, Interrupt
from kvmpy.virtio.devices.net import F_MRG_RXBUF, NetState, VirtioNet
from kvmpy.virtio.devices.tap import Tap
from kvmpy.virtio.queue import SplitQueue
from kvmpy.virtio.vhost.kernel import KernelVhost, VhostError
from kvmpy.virtio.vhost.rings import Irqfds, Rings

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
        #: kvmpy serves the queues itself (pages are being tracked for a migration), watching
        #: these kicks (queue index -> ioeventfd).
        self._in_python = False
        self._kick_watches: dict[int, int] = {}
        #: The VM is paused; the rings were taken back from the kernel for it (handed over again
        #: at resume).
        self._paused = self._held = False

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
            if self._in_python:
                self._unwatch_kicks()
                self._watch_kicks()

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
            self._checked(lambda: self._set_up(mem, acked_features))
            if not self._in_python:
                self._checked(self._give_rings)
            self._use_pairs(self._active)

    def _set_up(self, mem: GuestMemory, acked: int) -> None:
        for vhost in self._vhosts:
            vhost.set_features(acked & vhost.features)
            vhost.set_mem_table(mem.regions)

    def _give_rings(self) -> None:
        """Every pair's rings to its vhost-net, from the queues' positions (lock held)."""
        mem, interrupt = self._mem, self._interrupt
        assert mem is not None and interrupt is not None
        for vhost, rings, tap in zip(self._vhosts, self._rings, self._taps, strict=True):
            rings.hand_over(vhost, mem, self._queues, interrupt)
            for index in rings.started:
                vhost.set_net_backend(rings.ring_of(index), tap.fd)

    def _take_back(self) -> bool:
        """Every ring back from the kernel, the queues where it stopped; False if it had none."""
        mem = self._mem
        if mem is None or not any(rings.started for rings in self._rings):
            return False
        for vhost, rings in zip(self._vhosts, self._rings, strict=True):
            self._checked(functools.partial(self._detach, vhost, rings))
            self._checked(functools.partial(rings.take_back, vhost, mem, self._queues))
        return True

    @staticmethod
    def _detach(vhost: KernelVhost, rings: Rings) -> None:
        for index in rings.started:
            vhost.set_net_backend(rings.ring_of(index), None)

    def _start_receiving(self, pair: int) -> None:
        if self._in_python:  # else the kernel receives: an attached tap queue is all it needs
            super()._start_receiving(pair)

    def _stop_receiving(self, pair: int) -> None:
        if self._in_python:
            super()._stop_receiving(pair)

    def queue_notify(self, index: int) -> None:
        """A kick that exited instead of reaching the ioeventfd: pass it on to the kernel (or,
        for the control queue and while kvmpy serves the queues, handle it here)."""
        with self.guard.lock:
            if self._in_python or index == self._control_queue:
                super().queue_notify(index)
                return
            kick = self._rings[index // 2].kicks.get(index)
            if kick is not None:
                os.eventfd_write(kick, 1)

    def reset(self) -> None:
        with self.guard.lock:
            self._take_back()
            for rings in self._rings:
                rings.forget()
            self._held = False
            self._mem, self._queues, self._interrupt = None, [], None
            self._use_pairs(1)

    # --- pause, and what a snapshot or a migration needs --------------------------------------
    def pause(self) -> None:
        """The VM pauses: the kernel stops touching guest memory and the queues hold where it
        stopped, so a snapshot's rings and memory agree."""
        with self.guard.lock:
            self._paused = True
            if not self._in_python and self._take_back():
                self._held = True

    def resume(self) -> None:
        with self.guard.lock:
            self._paused = False
            if self._held:
                self._held = False
                self._checked(self._give_rings)

    def track_writes(self, tracking: bool) -> None:
        """Dirty tracking starts (a migration) or stops. What the kernel writes to guest
        memory is in neither KVM's dirty log nor GuestMemory's record, so while pages are
        tracked kvmpy's own data plane serves the queues, from where the kernel stopped."""
        with self.guard.lock:
            if tracking and not self._in_python:
                self._take_back()
                self._held = False
                self._in_python = True
                self._watch_kicks()
                self._use_pairs(self._active)
            elif not tracking and self._in_python:
                for pair in range(self.queue_pairs):
                    self._stop_receiving(pair)
                self._unwatch_kicks()
                self._in_python = False
                if self._mem is not None and self._paused:
                    self._held = True  # handed over when the VM resumes
                elif self._mem is not None:
                    self._checked(self._give_rings)

    def _watch_kicks(self) -> None:
        for index, kick in self._rings[0].kicks.items():
            if index != self._control_queue:
                self._kick_watches[index] = kick
                self._watch(kick, functools.partial(self._kicked, index, kick))

    def _unwatch_kicks(self) -> None:
        for kick in self._kick_watches.values():
            self._unwatch(kick)
        self._kick_watches = {}

    def _kicked(self, index: int, kick: int) -> None:
        drain(kick)
        self.guard.run(functools.partial(VirtioNet.queue_notify, self, index))

    def _checked(self, work: Callable[[], object]) -> None:
        """A vhost ioctl the kernel refused: the rings it was given were not usable (the
        transport checked they are guest RAM), so the device needs a reset (lock held)."""
        try:
            work()
        except VhostError as error:
            raise GuestError(f"vhost-net refused the rings: {error}") from None

    def save(self) -> NetState:
        """The model's state with the queues where the kernel left them (a snapshot is taken
        paused, so the rings are back already, except in a restored VM not yet resumed)."""
        with self.guard.lock:
            if not self._in_python and self._take_back():
                self._held = True
            return super().save()

    def close(self) -> None:
        with self.guard.lock:
            for pair in range(self.queue_pairs):
                self._stop_receiving(pair)
            self._unwatch_kicks()
            for rings in self._rings:
                rings.close_relays()
            self._watch_control(None)
        for vhost in self._vhosts:
            vhost.close()
        for tap in self._taps:
            tap.close()


__all__ = ["VHOST_NET", "VhostNet", "vhost_net_usable"]
