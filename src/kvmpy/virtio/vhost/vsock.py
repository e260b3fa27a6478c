"""virtio-vsock through the host kernel's vhost-vsock: AF_VSOCK between host and guest.

The guest gets a context id (CID); a host process reaches it with
``socket(AF_VSOCK)`` and ``connect((CID, PORT))``, and the guest's processes reach
the host at CID 2. /dev/vhost-vsock serves the receive and transmit queues in the
kernel, as vhost-net does virtio-net's; the third queue, for events the device
sends (a transport reset after migration), stays with kvmpy, which has none to send.

kvmpy chose this design over Firecracker's (vsock relayed to Unix sockets on the
host by the VMM) because it keeps every byte out of Python and lets host tools use
AF_VSOCK as they do with QEMU; Firecracker's ``PUT /vsock`` stays refused
(docs/api.md), since its ``uds_path`` means that other design.
"""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Callable

from kvmpy.abi import vhost as vh
from kvmpy.errors import ConfigError, GuestError, HostError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.device import COMMON_FEATURES, Interrupt
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import SplitQueue
from kvmpy.virtio.vhost.kernel import KernelVhost, VhostError
from kvmpy.virtio.vhost.rings import Irqfds, Rings, Unwatch, Watch

TYPE_VSOCK = 19
VHOST_VSOCK = "/dev/vhost-vsock"
RX, TX, EVENT = 0, 1, 2
#: CIDs 0-2 are the hypervisor's, the local loopback's and the host's; 2**32 - 1 is "any".
FIRST_GUEST_CID, LAST_GUEST_CID = 3, (1 << 32) - 2


class VhostVsock:
    device_type = TYPE_VSOCK
    queue_sizes: tuple[int, ...] = (256, 256, 16)

    def __init__(self, cid: int, watch: Watch, unwatch: Unwatch, vhost_path: str = VHOST_VSOCK) -> None:
        if not FIRST_GUEST_CID <= cid <= LAST_GUEST_CID:
            raise ConfigError(f"vsock CID {cid} is not a guest's: use {FIRST_GUEST_CID} to {LAST_GUEST_CID}")
        self.guard = DeviceGuard()
        self.cid = cid
        self._vhost = KernelVhost(vhost_path, module="vhost_vsock")
        try:
            fcntl.ioctl(self._vhost.fd, vh.VHOST_VSOCK_SET_GUEST_CID, vh.U64.pack(cid))
        except OSError as error:
            self._vhost.close()
            raise ConfigError(f"vsock CID {cid}: {error.strerror} (another VM may have it)") from None
        self.features = COMMON_FEATURES & self._vhost.features
        self._config = struct.pack("<Q", cid)
        self._rings = Rings(watch, unwatch)
        self._mem: GuestMemory | None = None
        self._queues: list[SplitQueue] = []
        self._interrupt: Interrupt | None = None
        #: The rings were taken back from the kernel for a pause (handed over again at resume).
        self._held = False

    # --- wiring from the PCI platform and the transport -------------------------------------
    def bind_irqfds(self, irqfds: Irqfds) -> None:
        self._rings.irqfds = irqfds

    def kicks_wired(self, kicks: dict[int, int]) -> None:
        with self.guard.lock:
            self._rings.kicks = dict(kicks)
            self._checked(lambda: self._rings.rewire_kicks(self._vhost))

    def interrupts_changed(self) -> None:
        with self.guard.lock:
            self._checked(lambda: self._rings.rewire_calls(self._vhost))

    # --- the VirtioDevice interface -----------------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        return self._config[offset : offset + size].ljust(size, b"\0")

    def write_config(self, offset: int, data: bytes) -> None:
        pass

    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        with self.guard.lock:
            self._mem, self._queues, self._interrupt = mem, queues, interrupt
            self._checked(lambda: self._hand_over(mem, queues, acked_features, interrupt))

    def _hand_over(
        self, mem: GuestMemory, queues: list[SplitQueue], acked: int, interrupt: Interrupt
    ) -> None:
        self._vhost.set_features(acked & self._vhost.features)
        self._vhost.set_mem_table(mem.regions)
        self._rings.hand_over(self._vhost, mem, queues[:EVENT], interrupt)  # events stay here
        self._set_running(True)

    def _set_running(self, running: bool) -> None:
        try:
            fcntl.ioctl(self._vhost.fd, vh.VHOST_VSOCK_SET_RUNNING, struct.pack("<i", int(running)))
        except OSError as error:
            raise VhostError(f"{VHOST_VSOCK}: VHOST_VSOCK_SET_RUNNING failed: {error.strerror}") from None

    def queue_notify(self, index: int) -> None:
        """A kick that exited: the kernel's rings get it; the event queue has nothing to do
        (the driver only gives it buffers for events kvmpy never sends)."""
        with self.guard.lock:
            if index != EVENT and index in self._rings.kicks:
                os.eventfd_write(self._rings.kicks[index], 1)

    def reset(self) -> None:
        with self.guard.lock:
            if self._rings.started:
                self._checked(lambda: self._set_running(False))
                self._checked(lambda: self._rings.stop(self._vhost))
            self._rings.forget()
            self._mem, self._queues, self._interrupt, self._held = None, [], None, False

    def pause(self) -> None:
        """The VM pauses: the kernel stops moving connections' bytes into guest memory, and the
        queues hold where it stopped."""
        with self.guard.lock:
            mem = self._mem
            if mem is not None and self._rings.started:
                self._checked(lambda: self._set_running(False))
                self._checked(lambda: self._rings.take_back(self._vhost, mem, self._queues))
                self._held = True

    def resume(self) -> None:
        with self.guard.lock:
            mem, interrupt = self._mem, self._interrupt
            if self._held and mem is not None and interrupt is not None:
                self._held = False
                rings = self._queues[:EVENT]  # events stay here
                self._checked(lambda: self._rings.hand_over(self._vhost, mem, rings, interrupt))
                self._checked(lambda: self._set_running(True))

    def _checked(self, work: Callable[[], object]) -> None:
        try:
            work()
        except VhostError as error:
            raise GuestError(f"vhost-vsock refused the rings: {error}") from None

    # --- state ------------------------------------------------------------------------------
    @property
    def state_type(self) -> type[object]:
        return object

    def save(self) -> object:
        raise HostError(
            "a vsock device cannot be snapshotted or migrated yet (its connections are the kernel's)"
        )

    def restore(self, state: object) -> None:
        raise HostError("a vsock device cannot be restored from a snapshot")

    def close(self) -> None:
        with self.guard.lock:
            self._rings.close_relays()
        self._vhost.close()


__all__ = ["TYPE_VSOCK", "VHOST_VSOCK", "VhostVsock"]
