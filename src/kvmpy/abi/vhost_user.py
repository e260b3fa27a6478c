"""The vhost-user wire format (QEMU's docs/interop/vhost-user.rst): message numbers, flags, layouts.

Every message is a 12-byte header (request, flags, payload size, all little-endian u32)
and a payload; file descriptors ride along as SCM_RIGHTS ancillary data. The front end
(kvmpy) sends requests; the back end (qemu-storage-daemon, virtiofsd) answers the ones
that have a reply, and acknowledges any other when REPLY_ACK is negotiated and asked for.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct("<III")  # request, flags, size
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
#: The largest payload kvmpy accepts from a back end (the biggest legitimate one, a memory
#: table of 8 regions, is 264 bytes; a device configuration space at most 256 + 12).
MAX_PAYLOAD = 4096

# Front-end requests.
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
RESET_DEVICE = 34
GET_MAX_MEM_SLOTS = 36

NAMES = {
    value: name
    for name, value in dict(globals()).items()
    if isinstance(value, int) and name.isupper() and name.startswith(("GET_", "SET_", "RESET_"))
}

#: The virtio feature bit a back end sets when it speaks protocol features; never offered to
#: the guest (it is bit 30, reserved in virtio for the transport).
F_PROTOCOL_FEATURES = 1 << 30

# Protocol features (bits of GET/SET_PROTOCOL_FEATURES).
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9
PROTOCOL_F_INFLIGHT_SHMFD = 1 << 12
PROTOCOL_F_RESET_DEVICE = 1 << 13

# Payloads.
U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")  # index, num
VRING_ADDR = struct.Struct("<IIQQQQ")  # index, flags, descriptor, used, available, log (HVAs)
MEMORY_HEADER = struct.Struct("<II")  # region count, padding
MEMORY_REGION = struct.Struct("<QQQQ")  # guest address, size, front-end address, mmap offset
MAX_MEMORY_REGIONS = 8
CONFIG_HEADER = struct.Struct("<III")  # offset, size, flags
MAX_CONFIG_SIZE = 256
INFLIGHT = struct.Struct("<QQHH")  # mmap size, mmap offset, queue count, queue size
#: SET_VRING_KICK/CALL: the ring index in the low byte; bit 8 says no file descriptor follows.
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

__all__ = [name for name in dict(globals()) if name.isupper()]
