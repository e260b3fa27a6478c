"""vhost-user-blk: a virtio-blk whose requests a back-end process serves (qemu-storage-daemon).

The back end owns the image and answers the device configuration (capacity,
limits, queue count); kvmpy passes through the virtio-blk features it knows
and, once the back end is lost, fails each request with VIRTIO_BLK_S_IOERR
(see :mod:`kvmpy.virtio.vhost.user_device` for everything else).
"""

from __future__ import annotations

import struct

from kvmpy.abi import vhost_user as vu
from kvmpy.virtio.device import F_EVENT_IDX, F_INDIRECT_DESC, F_VERSION_1, TYPE_BLOCK
from kvmpy.virtio.queue import DescriptorChain
from kvmpy.virtio.vhost.user_client import VhostUserClient, VhostUserError
from kvmpy.virtio.vhost.user_device import VhostUserDevice

# virtio-blk feature bits kvmpy passes through from the back end (virtio 1.x, 5.2.3).
F_SIZE_MAX, F_SEG_MAX, F_GEOMETRY, F_RO, F_BLK_SIZE = 1 << 1, 1 << 2, 1 << 4, 1 << 5, 1 << 6
F_FLUSH, F_TOPOLOGY, F_MQ, F_DISCARD, F_WRITE_ZEROES = 1 << 9, 1 << 10, 1 << 12, 1 << 13, 1 << 14
CONFIG_SIZE = 60  # through the write-zeroes limits
QUEUE_SIZE = 256
MAX_QUEUES = 16
S_IOERR = 1


class VhostUserBlock(VhostUserDevice):
    device_type = TYPE_BLOCK
    passed_features = (
        F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX | F_SIZE_MAX | F_SEG_MAX | F_GEOMETRY | F_RO
        | F_BLK_SIZE | F_FLUSH | F_TOPOLOGY | F_MQ | F_DISCARD | F_WRITE_ZEROES
    )  # fmt: skip
    wanted_protocol = vu.PROTOCOL_F_MQ | vu.PROTOCOL_F_REPLY_ACK | vu.PROTOCOL_F_CONFIG

    def configure(self, client: VhostUserClient, protocol: int) -> bytes:
        if not protocol & vu.PROTOCOL_F_CONFIG:
            raise VhostUserError(
                f"vhost-user back end {client.name} cannot report the disk's configuration (CONFIG)"
            )
        config = client.get_config(CONFIG_SIZE)
        self.capacity = struct.unpack_from("<Q", config)[0]
        queues = 1
        if self.features & F_MQ:
            queues = struct.unpack_from("<H", config, 34)[0]
            if protocol & vu.PROTOCOL_F_MQ:
                queues = min(queues, client.get_u64(vu.GET_QUEUE_NUM))
            if not 1 <= queues <= MAX_QUEUES:
                raise VhostUserError(f"vhost-user back end {client.name} offers {queues} queues")
        self.queue_sizes = (QUEUE_SIZE,) * queues
        return config

    def fail_request(self, chain: DescriptorChain) -> int:
        """The status byte (the last writable byte) says VIRTIO_BLK_S_IOERR."""
        if not chain.writable or len(chain.writable[-1]) < 1:
            return 0
        chain.writable[-1][-1] = S_IOERR
        return 1


__all__ = ["VhostUserBlock"]
