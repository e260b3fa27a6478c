"""virtio-net with its queues in the host kernel (vhost-net): packets never reach Python.

kvmpy keeps the device model the guest negotiates with (MAC, link status, the
offloads, all of :class:`~kvmpy.virtio.devices.net.VirtioNet`'s) and, at DRIVER_OK,
gives /dev/vhost-net the rings, guest RAM's layout in kvmpy's address space, the
queues' ioeventfds as kicks, their MSI-X irqfds as calls, and the tap as the back
end of both rings. The kernel's vhost worker then moves packets between the tap and
guest memory itself; the tap still adds and strips the virtio-net header (vnet_hdr),
as for the Python back end, so vhost-net's own header feature is not taken.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from kvmpy.errors import GuestError, HostError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.device import COMMON_FEATURES, Interrupt
from kvmpy.virtio.devices.net import NetState, VirtioNet, tap_offloads
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
        tap: Tap,
        mac: bytes,
        watch: Callable[[int, Callable[[], None]], None],
        unwatch: Callable[[int], None],
        vhost_path: str = VHOST_NET,
    ) -> None:
        super().__init__(tap, mac, watch, unwatch)
        self._vhost = KernelVhost(vhost_path)
        # Ring features only as far as the kernel serves them; device features are the tap's.
        ring_features = COMMON_FEATURES & ~self._vhost.features
        self.features = VirtioNet.features & ~ring_features
        self._rings = Rings(watch, unwatch)

    # --- wiring from the PCI platform and the transport -------------------------------------
    def bind_irqfds(self, irqfds: Irqfds) -> None:
        self._rings.irqfds = irqfds

    def kicks_wired(self, kicks: dict[int, int]) -> None:
        with self.guard.lock:
            self._rings.kicks = dict(kicks)
            self._checked(lambda: self._rings.rewire_kicks(self._vhost))

    def interrupts_changed(self) -> None:
        """A vector was masked or unmasked (MSI-X table or control word)."""
        with self.guard.lock:
            self._checked(lambda: self._rings.rewire_calls(self._vhost))

    # --- the VirtioDevice interface -----------------------------------------------------------
    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        self._tap.set_offloads(tap_offloads(acked_features))
        with self.guard.lock:
            self._mem, self._queues, self._interrupt = mem, queues, interrupt
            self._checked(lambda: self._hand_over(mem, queues, acked_features, interrupt))

    def _hand_over(
        self, mem: GuestMemory, queues: list[SplitQueue], acked: int, interrupt: Interrupt
    ) -> None:
        self._vhost.set_features(acked & self._vhost.features)
        self._vhost.set_mem_table(mem.regions)
        self._rings.hand_over(self._vhost, mem, queues, interrupt)
        for index in self._rings.started:
            self._vhost.set_net_backend(index, self._tap.fd)

    def queue_notify(self, index: int) -> None:
        """A kick that exited instead of reaching the ioeventfd: pass it on to the kernel."""
        with self.guard.lock:
            if index in self._rings.kicks:
                os.eventfd_write(self._rings.kicks[index], 1)

    def reset(self) -> None:
        with self.guard.lock:
            started = list(self._rings.started)
            self._checked(lambda: self._stop(started))
            self._rings.forget()
            self._mem, self._queues, self._interrupt = None, [], None

    def _stop(self, started: list[int]) -> None:
        for index in started:
            self._vhost.set_net_backend(index, None)
        self._rings.stop(self._vhost)

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
            self._rings.close_relays()
        self._vhost.close()
        self._tap.close()


__all__ = ["VHOST_NET", "VhostNet", "vhost_net_usable"]
