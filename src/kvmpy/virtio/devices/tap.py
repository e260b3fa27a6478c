"""A tap device: the host end of virtio-net (an Ethernet interface in the host's kernel)."""

from __future__ import annotations

import ctypes
import fcntl
import os

from kvmpy.abi import tun
from kvmpy.errors import ConfigError

VNET_HEADER_SIZE = 12  # struct virtio_net_hdr_v1, which VIRTIO_F_VERSION_1 always uses


class Tap:
    """Opens (creating if needed) tap ``name`` with virtio-net headers on every packet."""

    def __init__(self, name: str) -> None:
        if not 0 < len(name.encode()) < tun.IFNAMSIZ:
            raise ConfigError(f"tap name {name!r} must be 1 to {tun.IFNAMSIZ - 1} bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise ConfigError(f"cannot open /dev/net/tun for tap {name}: {error.strerror}") from None
        request = tun.ifreq(ifr_name=name.encode(), ifr_flags=tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR)
        try:
            fcntl.ioctl(self.fd, tun.TUNSETIFF, request)
            fcntl.ioctl(self.fd, tun.TUNSETVNETHDRSZ, ctypes.c_int(VNET_HEADER_SIZE))
        except OSError as error:
            os.close(self.fd)
            raise ConfigError(
                f"cannot attach to tap {name}: {error.strerror} (root or CAP_NET_ADMIN needed)"
            ) from None
        self.name = request.ifr_name.decode()

    def set_offloads(self, flags: int) -> None:
        """Which offloads the tap may hand us (only what the guest driver accepted)."""
        fcntl.ioctl(self.fd, tun.TUNSETOFFLOAD, flags)

    def close(self) -> None:
        os.close(self.fd)


__all__ = ["VNET_HEADER_SIZE", "Tap"]
