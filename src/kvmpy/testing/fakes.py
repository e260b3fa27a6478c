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


class NullMsiSender:
    """An MSI sender for a transport under test that delivers nothing (the tests read the rings)."""

    def send(self, vector: int, address: int, data: int) -> None:
        pass

    def changed(self, vector: int, address: int, data: int) -> None:
        pass


class FakeKernelVhost:
    """A /dev/vhost-* as kvmpy drives it (this host has none): what it was told, ring by ring.
    A test plays the kernel's part on the rings with a SplitQueue of its own."""

    def __init__(self, path: str, module: str = "vhost_net") -> None:
        self.fd = -1
        self.features = (1 << 32) | (1 << 15)  # VIRTIO_F_VERSION_1, VIRTIO_NET_F_MRG_RXBUF
        self.bases: dict[int, int] = {}
        self.backends: dict[int, int | None] = {}
        self.stops = 0

    def set_features(self, features: int) -> None:
        self.acked = features

    def set_mem_table(self, regions: object) -> None:
        pass

    def set_vring_num(self, index: int, size: int) -> None:
        pass

    def set_vring_addr(self, index: int, descriptors: int, used: int, available: int) -> None:
        pass

    def set_vring_base(self, index: int, base: int) -> None:
        self.bases[index] = base

    def get_vring_base(self, index: int) -> int:
        self.stops += 1
        return self.bases[index]

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        pass

    def set_vring_call(self, index: int, fd: int) -> None:
        pass

    def enable_vring(self, index: int) -> None:
        pass

    def set_net_backend(self, index: int, fd: int | None) -> None:
        self.backends[index] = fd

    def close(self) -> None:
        pass


__all__ = ["FakeKernelVhost", "NullMsiSender", "PortAccessor", "RecordingInterruptLine", "SocketTap"]
