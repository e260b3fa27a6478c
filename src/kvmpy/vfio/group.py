"""A VFIO group (/dev/vfio/N): the unit of isolation the IOMMU gives; it must be viable.

Viable means no member of the IOMMU group is still driven by a host driver: a device the
host uses could otherwise DMA into the same IOMMU domain as the guest's.
"""

from __future__ import annotations

import ctypes
import os

from kvmpy.abi import vfio as abi
from kvmpy.errors import ConfigError, HostError
from kvmpy.kvm.errors import KvmError
from kvmpy.vfio.container import Container
from kvmpy.vfio.kernel import VfioKernel
from kvmpy.vfio.sysfs import HostPaths, unviable_members


class Group:
    """One opened IOMMU group, checked viable, attached to ``container``."""

    def __init__(self, kernel: VfioKernel, paths: HostPaths, number: int, bdf: str) -> None:
        self._kernel = kernel
        self.number = number
        node = paths.group_node(number)
        try:
            self.fd = kernel.open(str(node))
        except FileNotFoundError:
            raise HostError(f"vfio={bdf}: {node} is missing although vfio-pci drives the device") from None
        except PermissionError:
            raise HostError(f"vfio={bdf}: no permission to open {node} (run as root or chown it)") from None
        except OSError as error:
            if error.errno == 16:  # EBUSY: another process holds the group
                raise HostError(f"vfio={bdf}: {node} is in use by another process (another VMM?)") from None
            raise HostError(f"vfio={bdf}: opening {node}: {error.strerror}") from None
        self.attached = False
        try:
            self._check_viable(paths, bdf)
        except BaseException:
            os.close(self.fd)
            raise

    def _check_viable(self, paths: HostPaths, bdf: str) -> None:
        status = abi.vfio_group_status(argsz=ctypes.sizeof(abi.vfio_group_status))
        self._kernel.ioctl(self.fd, abi.VFIO_GROUP_GET_STATUS, status, "VFIO_GROUP_GET_STATUS")
        if status.flags & abi.VFIO_GROUP_FLAGS_VIABLE:
            return
        others = unviable_members(paths, self.number)
        named = ", ".join(f"{member} (bound to {driver})" for member, driver in others) or "some member"
        raise ConfigError(
            f"vfio={bdf}: IOMMU group {self.number} is not viable: {named} still has a host driver;"
            " bind every device of the group to vfio-pci (or unbind it)"
        )

    def attach(self, container: Container) -> None:
        """Join ``container`` (the first group of a container is what VFIO_SET_IOMMU needs)."""
        fd = (ctypes.c_int32 * 1)(container.fd)
        self._kernel.ioctl(self.fd, abi.VFIO_GROUP_SET_CONTAINER, fd, "VFIO_GROUP_SET_CONTAINER")
        self.attached = True

    def device_fd(self, bdf: str) -> int:
        name = ctypes.create_string_buffer(bdf.encode())
        try:
            return self._kernel.ioctl(self.fd, abi.VFIO_GROUP_GET_DEVICE_FD, name, "VFIO_GROUP_GET_DEVICE_FD")
        except KvmError as error:
            raise HostError(f"vfio={bdf}: the kernel refused its device fd: {error}") from None

    def close(self) -> None:
        if self.fd < 0:
            return
        if self.attached:
            try:
                self._kernel.ioctl(self.fd, abi.VFIO_GROUP_UNSET_CONTAINER, 0, "VFIO_GROUP_UNSET_CONTAINER")
            except KvmError:
                pass  # closing the group detaches it as well
            self.attached = False
        os.close(self.fd)
        self.fd = -1


__all__ = ["Group"]
