"""A tap device: the host end of virtio-net (an Ethernet interface in the host's kernel).

A multi-queue tap (IFF_MULTI_QUEUE) is opened once per queue pair: each open file
is one queue, and the kernel spreads the packets it receives over the queues that
are attached, by flow, so one guest queue pair (and one guest vCPU) gets each flow.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from pathlib import Path

from kvmpy.abi import tun
from kvmpy.errors import ConfigError

VNET_HEADER_SIZE = 12  # struct virtio_net_hdr_v1, which VIRTIO_F_VERSION_1 always uses
#: Queue pairs one interface may have: each pair takes two MSI-X vectors and one tap queue.
MAX_QUEUE_PAIRS = 16


class Tap:
    """Opens (creating if needed) tap ``name`` with virtio-net headers on every packet;
    ``multi_queue`` opens one queue of a multi-queue tap."""

    def __init__(self, name: str, *, multi_queue: bool = False) -> None:
        if not 0 < len(name.encode()) < tun.IFNAMSIZ:
            raise ConfigError(f"tap name {name!r} must be 1 to {tun.IFNAMSIZ - 1} bytes")
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            raise ConfigError(f"cannot open /dev/net/tun for tap {name}: {error.strerror}") from None
        flags = tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR | (tun.IFF_MULTI_QUEUE if multi_queue else 0)
        request = tun.ifreq(ifr_name=name.encode(), ifr_flags=flags)
        try:
            fcntl.ioctl(self.fd, tun.TUNSETIFF, request)
            fcntl.ioctl(self.fd, tun.TUNSETVNETHDRSZ, ctypes.c_int(VNET_HEADER_SIZE))
        except OSError as error:
            os.close(self.fd)
            raise ConfigError(
                f"cannot attach to tap {name}: {error.strerror} (root or CAP_NET_ADMIN needed)"
            ) from None
        self.name = request.ifr_name.decode()
        self.attached = True

    def set_offloads(self, flags: int) -> None:
        """Which offloads the tap may hand us (only what the guest driver accepted)."""
        fcntl.ioctl(self.fd, tun.TUNSETOFFLOAD, flags)

    def set_attached(self, attached: bool) -> None:
        """Attach or detach this queue of a multi-queue tap: the kernel steers packets only
        to attached queues, so a queue pair the guest does not use holds none."""
        if attached != self.attached:  # the kernel refuses to attach (or detach) twice
            flags = tun.IFF_ATTACH_QUEUE if attached else tun.IFF_DETACH_QUEUE
            fcntl.ioctl(self.fd, tun.TUNSETQUEUE, tun.ifreq(ifr_flags=flags))
            self.attached = attached

    def close(self) -> None:
        os.close(self.fd)


def is_multi_queue(name: str) -> bool | None:
    """Whether tap ``name`` exists as a multi-queue tap (None: there is no such tap yet, so
    kvmpy creates it and may choose). A tap's flags must be matched to attach to it."""
    try:
        flags = int(Path(f"/sys/class/net/{name}/tun_flags").read_text(), 16)
    except (OSError, ValueError):
        return None
    return bool(flags & tun.IFF_MULTI_QUEUE)


def queue_pairs(name: str, requested: int, cpus: int) -> int:
    """How many queue pairs interface ``name`` gets: ``requested``, or (0) one per vCPU where the
    tap can have several queues and one where it was created with a single queue."""
    multi = is_multi_queue(name)
    if requested == 0:
        return 1 if multi is False else max(1, min(cpus, MAX_QUEUE_PAIRS))
    if requested > 1 and multi is False:
        raise ConfigError(
            f"tap {name} has a single queue, so it cannot carry {requested} queue pairs: create it"
            f" with 'ip tuntap add dev {name} mode tap multi_queue', or use queues=1"
        )
    return requested


def open_taps(name: str, pairs: int) -> list[Tap]:
    """One open tap queue per queue pair (a multi-queue tap as soon as there are two, or when
    the existing tap is one)."""
    multi_queue = pairs > 1 or is_multi_queue(name) is True
    taps: list[Tap] = []
    try:
        for _ in range(pairs):
            taps.append(Tap(name, multi_queue=multi_queue))
    except BaseException:
        for tap in taps:
            tap.close()
        raise
    return taps


__all__ = ["MAX_QUEUE_PAIRS", "VNET_HEADER_SIZE", "Tap", "is_multi_queue", "open_taps", "queue_pairs"]
