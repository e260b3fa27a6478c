"""What a virtio device model provides to its transport, whatever the transport is."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.guard import DeviceGuard
from kvmpy.virtio.queue import SplitQueue

# Feature bits common to every device (virtio 1.x, 6).
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_VERSION_1 = 1 << 32
F_ACCESS_PLATFORM = 1 << 33
F_RING_RESET = 1 << 40
COMMON_FEATURES = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX

# Device types (5).
TYPE_NET = 1
TYPE_BLOCK = 2
TYPE_CONSOLE = 3
TYPE_RNG = 4

#: Signals the driver that queue N has used buffers (the transport knows how).
Interrupt = Callable[[int], None]


class VirtioDevice(Protocol):
    device_type: int
    #: Maximum size of each queue; its length is the number of queues.
    queue_sizes: tuple[int, ...]
    #: Features offered to the driver (COMMON_FEATURES | device bits).
    features: int
    #: The device's one lock, shared with its transport, and its guest-error path.
    guard: DeviceGuard

    def read_config(self, offset: int, size: int) -> bytes: ...

    def write_config(self, offset: int, data: bytes) -> None: ...

    def activate(
        self, mem: GuestMemory, queues: list[SplitQueue], acked_features: int, interrupt: Interrupt
    ) -> None:
        """DRIVER_OK: the rings are set up, work may start."""

    def queue_notify(self, index: int) -> None:
        """The driver made buffers available on queue ``index`` (any thread; lock held)."""

    def reset(self) -> None:
        """The driver reset the device: drop every reference to guest memory (lock held)."""


__all__ = [
    "COMMON_FEATURES",
    "F_EVENT_IDX",
    "F_INDIRECT_DESC",
    "F_VERSION_1",
    "TYPE_BLOCK",
    "TYPE_CONSOLE",
    "TYPE_NET",
    "TYPE_RNG",
    "Interrupt",
    "VirtioDevice",
]
