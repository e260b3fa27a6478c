"""Test doubles shipped with kvmpy, for its own tests and for anyone writing a device."""

from __future__ import annotations

import socket


class RecordingInterruptLine:
    """An InterruptLine that remembers every level it was driven to."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    @property
    def level(self) -> bool:
        return self.levels[-1] if self.levels else False

    def set_level(self, high: bool) -> None:
        self.levels.append(high)

    def pulse(self) -> None:
        self.levels += [True, False]


class PortAccessor:
    """Byte-wide register access to a bus device, as a guest driver would do it."""

    def __init__(self, device: object) -> None:
        self.device = device

    def inb(self, offset: int) -> int:
        data = bytearray(1)
        self.device.read(offset, memoryview(data))  # type: ignore[attr-defined]
        return data[0]

    def outb(self, offset: int, value: int) -> None:
        self.device.write(offset, bytes([value]))  # type: ignore[attr-defined]


class SocketTap:
    """A tap stand-in for virtio-net: a datagram socket pair, one packet per writev/readv.

    The device gets ``fd`` (non-blocking); the test talks to ``host``.
    """

    def __init__(self) -> None:
        self.host, self._device_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._device_side.setblocking(False)
        self.fd = self._device_side.fileno()
        self.offloads: list[int] = []
        #: Whether the kernel would steer packets to this queue (a multi-queue tap's).
        self.attached = True

    def set_offloads(self, flags: int) -> None:
        self.offloads.append(flags)

    def set_attached(self, attached: bool) -> None:
        self.attached = attached

    def close(self) -> None:
        self._device_side.close()
        self.host.close()


__all__ = ["PortAccessor", "RecordingInterruptLine", "SocketTap"]
