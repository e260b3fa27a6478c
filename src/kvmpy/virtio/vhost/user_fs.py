"""vhost-user-fs: a virtio-fs device whose FUSE requests a back-end process serves (virtiofsd).

The guest mounts it by its tag (``mount -t virtiofs TAG /mnt``) and sends FUSE
requests over its queues: queue 0 is the high-priority queue (FORGET and
INTERRUPT, which have no reply), the rest are request queues (virtio 1.2,
5.11). virtiofsd 7.2 does not offer VHOST_USER_PROTOCOL_F_CONFIG, and the tag
is kvmpy's to choose anyway, so kvmpy builds the configuration space itself:
the tag (36 bytes, NUL-padded) and the number of request queues.

Once the back end is lost, each request is answered by kvmpy with a FUSE
reply that says EIO, so the guest's file operations fail instead of hanging
(see :mod:`kvmpy.virtio.vhost.user_device` for everything else).
"""

from __future__ import annotations

import errno
import struct

from kvmpy.abi import vhost_user as vu
from kvmpy.errors import ConfigError
from kvmpy.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1
from kvmpy.virtio.queue import DescriptorChain
from kvmpy.virtio.vhost.user_client import VhostUserClient, VhostUserError
from kvmpy.virtio.vhost.user_device import Unwatch, VhostUserDevice, Watch

TYPE_FS = 26
TAG_SIZE = 36
#: struct virtio_fs_config: the tag, then num_request_queues (le32).
CONFIG = struct.Struct(f"<{TAG_SIZE}sI")
#: Descriptors per queue (QEMU's vhost-user-fs default; virtiofsd takes up to 1024).
QUEUE_SIZE = 128
#: virtiofsd 7.2 serves one request queue and exits if given more.
MAX_REQUEST_QUEUES = 1
#: struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, padding.
FUSE_IN_HEADER = struct.Struct("<IIQQIIII")
#: struct fuse_out_header: len, error (a negative errno), unique.
FUSE_OUT_HEADER = struct.Struct("<IiQ")


def check_tag(tag: str) -> bytes:
    """The tag as the configuration space holds it: 1 to 36 bytes of UTF-8, no NUL."""
    encoded = tag.encode()
    if not 1 <= len(encoded) <= TAG_SIZE or b"\0" in encoded:
        raise ConfigError(f"virtio-fs tag {tag!r} must be 1 to {TAG_SIZE} bytes without NUL")
    return encoded


def fs_config(tag: str, request_queues: int) -> bytes:
    """struct virtio_fs_config for ``tag`` and ``request_queues``."""
    return CONFIG.pack(check_tag(tag), request_queues)


class VhostUserFs(VhostUserDevice):
    device_type = TYPE_FS
    passed_features = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX
    wanted_protocol = vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK

    def __init__(
        self,
        client: VhostUserClient,
        name: str,
        watch: Watch,
        unwatch: Unwatch,
        *,
        tag: str,
        request_queues: int = 1,
    ) -> None:
        if not 1 <= request_queues <= MAX_REQUEST_QUEUES:
            raise ConfigError(f"{name}: virtiofsd serves one request queue, not {request_queues}")
        check_tag(tag)
        self.tag = tag
        self.request_queues = request_queues
        super().__init__(client, name, watch, unwatch)

    def configure(self, client: VhostUserClient, protocol: int) -> bytes:
        queues = 1 + self.request_queues
        if protocol & vu.PROTOCOL_F_MQ and client.get_u64(vu.GET_QUEUE_NUM) < queues:
            raise VhostUserError(f"vhost-user back end {client.name} cannot serve {queues} queues")
        self.queue_sizes = (QUEUE_SIZE,) * queues
        return fs_config(self.tag, self.request_queues)

    def fail_request(self, chain: DescriptorChain) -> int:
        """A fuse_out_header with -EIO and the request's ``unique``, if the chain has room."""
        head = _gather(chain.readable, FUSE_IN_HEADER.size)
        if len(head) < FUSE_IN_HEADER.size or chain.writable_length < FUSE_OUT_HEADER.size:
            return 0  # FORGET and INTERRUPT have no reply; a malformed chain gets none either
        unique = FUSE_IN_HEADER.unpack(head)[2]
        reply = FUSE_OUT_HEADER.pack(FUSE_OUT_HEADER.size, -errno.EIO, unique)
        _scatter(chain.writable, reply)
        return len(reply)


def _gather(buffers: list[memoryview], size: int) -> bytes:
    """The first ``size`` bytes of ``buffers`` (fewer if they are shorter)."""
    data = b""
    for buffer in buffers:
        if len(data) >= size:
            break
        data += bytes(buffer[: size - len(data)])
    return data


def _scatter(buffers: list[memoryview], data: bytes) -> None:
    """Write ``data`` across ``buffers`` in order (the caller checked they hold it)."""
    for buffer in buffers:
        if not data:
            return
        count = min(len(buffer), len(data))
        buffer[:count] = data[:count]
        data = data[count:]


__all__ = ["TYPE_FS", "VhostUserFs", "check_tag", "fs_config"]
