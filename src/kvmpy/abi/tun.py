"""The TUN/TAP ioctl interface (<linux/if_tun.h>): creating a tap and its vnet header.

kvm.h is generated; this small interface is written out, with the ioctl
numbers derived from the _IOW encoding the header uses.
"""

from __future__ import annotations

import ctypes

_IOC_WRITE = 1


def _iow(kind: str, number: int, size: int) -> int:
    return (_IOC_WRITE << 30) | (size << 16) | (ord(kind) << 8) | number


TUNSETIFF = _iow("T", 202, ctypes.sizeof(ctypes.c_int))
TUNSETOFFLOAD = _iow("T", 208, ctypes.sizeof(ctypes.c_uint))
TUNSETVNETHDRSZ = _iow("T", 216, ctypes.sizeof(ctypes.c_int))
TUNSETQUEUE = _iow("T", 217, ctypes.sizeof(ctypes.c_int))

IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_ATTACH_QUEUE = 0x0200
IFF_DETACH_QUEUE = 0x0400
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_UFO = 0x10

IFNAMSIZ = 16


class ifreq(ctypes.Structure):  # noqa: N801 (C name)
    _fields_ = [
        ("ifr_name", ctypes.c_char * IFNAMSIZ),
        ("ifr_flags", ctypes.c_short),
        ("pad", ctypes.c_char * 22),
    ]


assert ctypes.sizeof(ifreq) == 40
assert TUNSETIFF == 0x400454CA
assert TUNSETQUEUE == 0x400454D9
