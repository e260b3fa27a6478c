"""A ring back end in the host's kernel: /dev/vhost-net (Linux drivers/vhost), through ioctls.

The kernel's vhost worker runs in kvmpy's own address space (VHOST_SET_OWNER binds it
to this process), so the memory table holds kvmpy's addresses of guest RAM and no file
descriptors: private memory works, and nothing needs to be shared.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Sequence

from kvmpy.abi import vhost as vh
from kvmpy.errors import ConfigError, HostError
from kvmpy.memory.guest_memory import MemoryRegion


class VhostError(HostError):
    """A vhost ioctl failed."""


class KernelVhost:
    """One open vhost device (:class:`kvmpy.virtio.vhost.rings.RingBackend` over ioctls)."""

    def __init__(self, path: str, module: str = "vhost_net") -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise ConfigError(f"cannot open {path}: {error.strerror} (is {module} loaded?)") from None
        self.path = path
        try:
            self._ioctl("VHOST_SET_OWNER", vh.VHOST_SET_OWNER, 0)
            self.features = int(vh.U64.unpack(self._ioctl("VHOST_GET_FEATURES", vh.VHOST_GET_FEATURES,
                                                          bytes(8)))[0])  # fmt: skip
        except BaseException:
            os.close(self.fd)
            raise

    def _ioctl(self, name: str, request: int, argument: bytes | int) -> bytes:
        try:
            result = fcntl.ioctl(self.fd, request, argument)
        except OSError as error:
            raise VhostError(f"{self.path}: {name} failed: {error.strerror}") from None
        return result if isinstance(result, bytes) else b""

    def set_features(self, features: int) -> None:
        self._ioctl("VHOST_SET_FEATURES", vh.VHOST_SET_FEATURES, vh.U64.pack(features))

    def set_mem_table(self, regions: Sequence[MemoryRegion]) -> None:
        table = vh.MEMORY_HEADER.pack(len(regions), 0) + b"".join(
            vh.MEMORY_REGION.pack(region.gpa, region.size, region.host_address(), 0) for region in regions
        )
        self._ioctl("VHOST_SET_MEM_TABLE", vh.VHOST_SET_MEM_TABLE, table)

    def set_vring_num(self, index: int, size: int) -> None:
        self._ioctl("VHOST_SET_VRING_NUM", vh.VHOST_SET_VRING_NUM, vh.VRING_STATE.pack(index, size))

    def set_vring_addr(self, index: int, descriptors: int, used: int, available: int) -> None:
        address = vh.VRING_ADDR.pack(index, 0, descriptors, used, available, 0)
        self._ioctl("VHOST_SET_VRING_ADDR", vh.VHOST_SET_VRING_ADDR, address)

    def set_vring_base(self, index: int, base: int) -> None:
        self._ioctl("VHOST_SET_VRING_BASE", vh.VHOST_SET_VRING_BASE, vh.VRING_STATE.pack(index, base))

    def get_vring_base(self, index: int) -> int:
        answer = self._ioctl("VHOST_GET_VRING_BASE", vh.VHOST_GET_VRING_BASE, vh.VRING_STATE.pack(index, 0))
        return int(vh.VRING_STATE.unpack(answer)[1])

    def set_vring_kick(self, index: int, fd: int | None) -> None:
        self._ioctl("VHOST_SET_VRING_KICK", vh.VHOST_SET_VRING_KICK, vh.VRING_FILE.pack(index, _fd(fd)))

    def set_vring_call(self, index: int, fd: int) -> None:
        self._ioctl("VHOST_SET_VRING_CALL", vh.VHOST_SET_VRING_CALL, vh.VRING_FILE.pack(index, fd))

    def enable_vring(self, index: int) -> None:
        pass  # a kernel ring runs once it has a kick and (for vhost-net) a back end

    def set_net_backend(self, index: int, fd: int | None) -> None:
        """The tap the ring's packets go to and come from (None: detach, the ring stops)."""
        self._ioctl("VHOST_NET_SET_BACKEND", vh.VHOST_NET_SET_BACKEND, vh.VRING_FILE.pack(index, _fd(fd)))

    def close(self) -> None:
        os.close(self.fd)


def _fd(fd: int | None) -> int:
    return -1 if fd is None else fd


__all__ = ["KernelVhost", "VhostError"]
