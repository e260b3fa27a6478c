"""A VFIO device fd: its regions (config space, BARs, ROM), interrupts, and reset.

Regions sit at fixed offsets of the one fd (``RegionInfo.offset``): config space and
trapped BAR accesses are pread/pwrite there, mappable BARs are mmapped from there.
Interrupts are eventfds the kernel signals from the device's own interrupt handler;
kvmpy binds each to a KVM irqfd, so an interrupt never reaches Python.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
from dataclasses import dataclass

from kvmpy.abi import vfio as abi
from kvmpy.errors import HostError
from kvmpy.kvm.errors import KvmError
from kvmpy.ratelimit import guest_log
from kvmpy.vfio.kernel import VfioKernel

log = logging.getLogger("kvmpy.vfio")


@dataclass(frozen=True, slots=True)
class RegionInfo:
    index: int
    flags: int
    size: int
    offset: int
    #: Parts of the region that may be mmapped (offset, size); the whole region if no sparse cap.
    mmap_areas: tuple[tuple[int, int], ...]

    @property
    def mappable(self) -> bool:
        return bool(self.flags & abi.VFIO_REGION_INFO_FLAG_MMAP) and self.size > 0


@dataclass(frozen=True, slots=True)
class IrqInfo:
    index: int
    flags: int
    count: int


class VfioDevice:
    """One assigned device's fd and what the kernel says about it."""

    def __init__(self, kernel: VfioKernel, fd: int, bdf: str) -> None:
        self._kernel = kernel
        self.fd = fd
        self.bdf = bdf
        info = abi.vfio_device_info(argsz=ctypes.sizeof(abi.vfio_device_info))
        kernel.ioctl(fd, abi.VFIO_DEVICE_GET_INFO, info, "VFIO_DEVICE_GET_INFO")
        if not info.flags & abi.VFIO_DEVICE_FLAGS_PCI:
            os.close(fd)
            raise HostError(f"vfio={bdf}: not a vfio-pci device (flags {info.flags:#x})")
        if info.num_regions <= abi.VFIO_PCI_CONFIG_REGION_INDEX:
            os.close(fd)
            raise HostError(f"vfio={bdf}: the device has no configuration region")
        self.flags = info.flags
        self.regions = [self._region_info(i) for i in range(min(info.num_regions, abi.VFIO_PCI_NUM_REGIONS))]
        self.irqs = [self._irq_info(i) for i in range(min(info.num_irqs, abi.VFIO_PCI_NUM_IRQS))]

    # --- what the kernel says ---------------------------------------------------------------
    def _region_info(self, index: int) -> RegionInfo:
        info = abi.vfio_region_info(argsz=ctypes.sizeof(abi.vfio_region_info), index=index)
        try:
            self._kernel.ioctl(self.fd, abi.VFIO_DEVICE_GET_REGION_INFO, info, "VFIO_DEVICE_GET_REGION_INFO")
        except KvmError as error:
            if error.errno != errno.EINVAL or index == abi.VFIO_PCI_CONFIG_REGION_INDEX:
                raise
            # vfio-pci answers EINVAL for a region the device lacks (the VGA one, on all but VGA
            # devices), where it answers size 0 for a missing BAR or ROM: the same thing here.
            return RegionInfo(index, 0, 0, 0, ())
        areas: tuple[tuple[int, int], ...] = ((0, info.size),)
        if info.flags & abi.VFIO_REGION_INFO_FLAG_CAPS and info.argsz > ctypes.sizeof(info):
            areas = self._sparse_areas(index, info.argsz) or areas
        return RegionInfo(index, info.flags, info.size, info.offset, areas)

    def _sparse_areas(self, index: int, argsz: int) -> tuple[tuple[int, int], ...] | None:
        """Asked again with room for the capability chain: the sparse-mmap areas, if listed."""
        buffer = bytearray(argsz)
        head = abi.vfio_region_info.from_buffer(buffer)
        head.argsz, head.index = argsz, index
        self._kernel.ioctl(self.fd, abi.VFIO_DEVICE_GET_REGION_INFO, buffer, "VFIO_DEVICE_GET_REGION_INFO")
        offset, seen = head.cap_offset, 0
        del head
        while offset and offset + ctypes.sizeof(abi.vfio_info_cap_header) <= argsz and seen < 16:
            cap = abi.vfio_info_cap_header.from_buffer_copy(buffer, offset)
            if cap.id == abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                sparse = abi.vfio_region_info_cap_sparse_mmap.from_buffer_copy(buffer, offset)
                start = offset + ctypes.sizeof(sparse)
                size = ctypes.sizeof(abi.vfio_region_sparse_mmap_area)
                count = min(sparse.nr_areas, (argsz - start) // size)
                area = abi.vfio_region_sparse_mmap_area.from_buffer_copy
                found = [area(buffer, start + i * size) for i in range(count)]
                return tuple((item.offset, item.size) for item in found)
            offset, seen = cap.next, seen + 1
        return None

    def _irq_info(self, index: int) -> IrqInfo:
        info = abi.vfio_irq_info(argsz=ctypes.sizeof(abi.vfio_irq_info), index=index)
        try:
            self._kernel.ioctl(self.fd, abi.VFIO_DEVICE_GET_IRQ_INFO, info, "VFIO_DEVICE_GET_IRQ_INFO")
        except KvmError as error:
            if error.errno != errno.EINVAL:
                raise
            return IrqInfo(index, 0, 0)  # the error interrupt of a device that is not PCIe: none
        return IrqInfo(index, info.flags, info.count)

    @property
    def resettable(self) -> bool:
        return bool(self.flags & abi.VFIO_DEVICE_FLAGS_RESET)

    # --- regions -----------------------------------------------------------------------------
    def read(self, region: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of region ``region``: all-ones past its end or when the
        kernel refuses (a device mid-reset answers EIO), as a bus answers a master abort."""
        info = self.regions[region]
        if offset < 0 or offset + size > info.size:
            return b"\xff" * size
        try:
            data = os.pread(self.fd, size, info.offset + offset)
        except OSError as error:
            self._refused("read", region, offset, error)
            return b"\xff" * size
        return data if len(data) == size else data + b"\xff" * (size - len(data))

    def write(self, region: int, offset: int, data: bytes) -> None:
        """Write to region ``region``; what is out of range or refused is dropped (and logged)."""
        info = self.regions[region]
        if offset < 0 or offset + len(data) > info.size:
            return
        try:
            os.pwrite(self.fd, data, info.offset + offset)
        except OSError as error:
            self._refused("write", region, offset, error)

    def _refused(self, what: str, region: int, offset: int, error: OSError) -> None:
        message = "%s: the kernel refused a %s of region %d at %#x: %s"
        details = (self.bdf, what, region, offset, error.strerror)
        guest_log.warning(log, ("vfio-io", self.bdf, what), message, *details)

    def map_region(self, region: int, offset: int, size: int) -> mmap.mmap:
        """Map part of a mappable region (page-aligned) into kvmpy, for a KVM memory slot."""
        info = self.regions[region]
        protection = mmap.PROT_READ | mmap.PROT_WRITE
        return mmap.mmap(self.fd, size, mmap.MAP_SHARED, protection, offset=info.offset + offset)

    # --- interrupts ----------------------------------------------------------------------------
    def set_irq_eventfds(self, index: int, start: int, fds: list[int]) -> None:
        """Bind vectors ``start..`` of interrupt ``index`` to ``fds`` (-1 unbinds one)."""
        request = abi.make_irq_set_eventfds(index, start, fds)
        self._kernel.ioctl(self.fd, abi.VFIO_DEVICE_SET_IRQS, request, "VFIO_DEVICE_SET_IRQS")

    def disable_irqs(self, index: int) -> None:
        """Switch interrupt ``index`` off on the device (MSI-X disabled, eventfds dropped)."""
        request = abi.make_irq_set_none(index, 0, 0, abi.VFIO_IRQ_SET_ACTION_TRIGGER)
        self._kernel.ioctl(self.fd, abi.VFIO_DEVICE_SET_IRQS, request, "VFIO_DEVICE_SET_IRQS")

    def unmask_intx(self) -> None:
        request = abi.make_irq_set_none(abi.VFIO_PCI_INTX_IRQ_INDEX, 0, 1, abi.VFIO_IRQ_SET_ACTION_UNMASK)
        self._kernel.ioctl(self.fd, abi.VFIO_DEVICE_SET_IRQS, request, "VFIO_DEVICE_SET_IRQS")

    def set_intx_unmask_fd(self, fd: int) -> None:
        """Unmask INTx whenever ``fd`` is signalled (KVM's resample fd: the guest's EOI)."""
        request = abi.make_irq_set_eventfds(abi.VFIO_PCI_INTX_IRQ_INDEX, 0, [fd])
        raw = bytearray(request.raw)
        header = abi.vfio_irq_set.from_buffer(raw)
        header.flags = abi.VFIO_IRQ_SET_DATA_EVENTFD | abi.VFIO_IRQ_SET_ACTION_UNMASK
        del header
        self._kernel.ioctl(self.fd, abi.VFIO_DEVICE_SET_IRQS, raw, "VFIO_DEVICE_SET_IRQS")

    def reset(self) -> bool:
        """Function-level reset if the device has one; returns whether it was reset."""
        if not self.resettable:
            return False
        self._kernel.ioctl(self.fd, abi.VFIO_DEVICE_RESET, 0, "VFIO_DEVICE_RESET")
        return True

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


__all__ = ["IrqInfo", "RegionInfo", "VfioDevice"]
