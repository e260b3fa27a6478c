"""The kernel's vhost ioctls (<linux/vhost.h>, <linux/vhost_types.h>): rings served in the kernel.

/dev/vhost-net (and /dev/vhost-vsock) take the same ring set-up as a vhost-user back end,
as ioctls on a file descriptor instead of messages on a socket. The numbers follow the
_IO/_IOR/_IOW encoding of <asm-generic/ioctl.h>, checked below against values of a built
kernel.
"""

from __future__ import annotations

import struct

_NONE, _WRITE, _READ = 0, 1, 2
VHOST_VIRTIO = 0xAF


def _ioc(direction: int, number: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (VHOST_VIRTIO << 8) | number


U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_FILE = struct.Struct("<Ii")  # index, fd (-1: none)
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, descriptor, used, available, log
MEMORY_HEADER = struct.Struct("<II")  # region count, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest address, size, userspace address, flags/padding

VHOST_GET_FEATURES = _ioc(_READ, 0x00, U64.size)
VHOST_SET_FEATURES = _ioc(_WRITE, 0x00, U64.size)
VHOST_SET_OWNER = _ioc(_NONE, 0x01, 0)
VHOST_RESET_OWNER = _ioc(_NONE, 0x02, 0)
VHOST_SET_MEM_TABLE = _ioc(_WRITE, 0x03, MEMORY_HEADER.size)
VHOST_SET_VRING_NUM = _ioc(_WRITE, 0x10, VRING_STATE.size)
VHOST_SET_VRING_ADDR = _ioc(_WRITE, 0x11, VRING_ADDR.size)
VHOST_SET_VRING_BASE = _ioc(_WRITE, 0x12, VRING_STATE.size)
VHOST_GET_VRING_BASE = _ioc(_READ | _WRITE, 0x12, VRING_STATE.size)
VHOST_SET_VRING_KICK = _ioc(_WRITE, 0x20, VRING_FILE.size)
VHOST_SET_VRING_CALL = _ioc(_WRITE, 0x21, VRING_FILE.size)
VHOST_NET_SET_BACKEND = _ioc(_WRITE, 0x30, VRING_FILE.size)
VHOST_VSOCK_SET_GUEST_CID = _ioc(_WRITE, 0x60, U64.size)
VHOST_VSOCK_SET_RUNNING = _ioc(_WRITE, 0x61, 4)

#: vhost-net's own feature bit: it adds the virtio-net header itself (kvmpy lets the tap do it).
VHOST_NET_F_VIRTIO_NET_HDR = 1 << 27
VHOST_F_LOG_ALL = 1 << 26

assert VHOST_SET_OWNER == 0xAF01
assert VHOST_SET_MEM_TABLE == 0x4008AF03
assert VHOST_GET_VRING_BASE == 0xC008AF12
assert VHOST_NET_SET_BACKEND == 0x4008AF30
assert VHOST_VSOCK_SET_GUEST_CID == 0x4008AF60
assert VHOST_VSOCK_SET_RUNNING == 0x4004AF61

__all__ = [name for name in dict(globals()) if name.isupper()]
