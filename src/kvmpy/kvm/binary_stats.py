"""KVM's own counters (KVM_GET_STATS_FD): the exits userspace never sees.

With the irqchip, PIT, ioeventfd and the MMU in the kernel, most exits are
handled there and never reach kvmpy's loop. The binary stats interface
(Documentation/virt/kvm/api.rst, "KVM_GET_STATS_FD") exposes KVM's counters
for a VM or a vCPU: total exits, halt exits, I/O and MMIO exits, and more.
Reading them next to kvmpy's own counters shows the whole picture.
"""

from __future__ import annotations

import os
import struct

_HEADER = struct.Struct("<IIIIII")  # flags, name_size, num_desc, id_offset, desc_offset, data_offset
_DESC = struct.Struct("<IhHII")  # flags, exponent, size, offset, bucket_size (then the name)
_MAX_DESCRIPTORS = 4096


class BinaryStats:
    """A stats file descriptor and its descriptors, read once at open."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        header = os.pread(fd, _HEADER.size, 0)
        _, name_size, count, _, desc_offset, data_offset = _HEADER.unpack(header)
        count = min(count, _MAX_DESCRIPTORS)
        desc_size = _DESC.size + name_size
        raw = os.pread(fd, desc_size * count, desc_offset)
        self._fields: list[tuple[str, int, int]] = []  # name, data offset, size in u64s
        for i in range(count):
            chunk = raw[i * desc_size : (i + 1) * desc_size]
            if len(chunk) < desc_size:
                break
            _, _, size, offset, _ = _DESC.unpack_from(chunk)
            name = chunk[_DESC.size :].split(b"\0", 1)[0].decode("ascii", "replace")
            self._fields.append((name, data_offset + offset, size))

    def read(self) -> dict[str, int]:
        """Current values of every single-valued counter."""
        values: dict[str, int] = {}
        for name, offset, size in self._fields:
            if size != 1:
                continue
            data = os.pread(self.fd, 8, offset)
            if len(data) == 8:
                values[name] = struct.unpack("<Q", data)[0]
        return values

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["BinaryStats"]
