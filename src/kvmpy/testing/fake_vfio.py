"""A fake VFIO kernel interface for tests on hosts without an IOMMU (this one has none).

:class:`FakeVfioKernel` answers the container, group and device ioctls the way
Documentation/driver-api/vfio.rst describes them, enforcing their order (a group joins a
container before VFIO_SET_IOMMU, DMA maps after it); its device fd is a real memfd holding
the regions at their offsets, so kvmpy's pread/pwrite/mmap run unchanged against it.
:func:`build_host_tree` lays out the /sys and /dev entries VFIO's users look at.

The device it plays is a small NVMe-like function: a 64-bit, mappable 16 KiB BAR0 with the
MSI-X table at 0x2000 and the PBA at 0x3000 (both also listed as not mappable, as a
kernel without MSIX_MAPPABLE would), a 4 KiB BAR4 that can only be read and written, a
capability list of PM, MSI (hidden by kvmpy) and MSI-X.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from kvmpy.abi import vfio as abi
from kvmpy.kvm.errors import KvmError
from kvmpy.kvm.ioctl import Buffer
from kvmpy.vfio.sysfs import HostPaths

REGION_STRIDE = 1 << 20  # the fake's region offsets in the device fd (the kernel uses 1 << 40)
BAR0_SIZE = 0x4000
BAR4_SIZE = 0x1000
MSIX_VECTORS = 8
MSIX_TABLE = 0x2000
MSIX_PBA = 0x3000
CONFIG_SIZE = 256
PM_CAP, MSI_CAP, MSIX_CAP = 0x40, 0x50, 0x70
VENDOR, DEVICE = 0x1B36, 0x0010


def build_host_tree(
    root: Path,
    bdf: str,
    group: int,
    *,
    driver: str | None = "vfio-pci",
    iommu: bool = True,
    vfio_node: bool = True,
    group_members: dict[str, str | None] | None = None,
) -> HostPaths:
    """A /sys and /dev under ``root`` with ``bdf`` in IOMMU group ``group`` bound to ``driver``;
    ``group_members`` adds other devices of the group (address -> driver)."""
    paths = HostPaths(root / "sys", root / "dev")
    members = {bdf: driver, **(group_members or {})}
    drivers = paths.sys / "bus" / "pci" / "drivers"
    group_dir = paths.sys / "kernel" / "iommu_groups" / str(group)
    (group_dir / "devices").mkdir(parents=True, exist_ok=True)
    for member, bound in members.items():
        device = paths.device(member)
        device.mkdir(parents=True, exist_ok=True)
        if bound is not None:
            (drivers / bound).mkdir(parents=True, exist_ok=True)
            (device / "driver").symlink_to(drivers / bound)
        if iommu:
            (device / "iommu_group").symlink_to(group_dir)
            (group_dir / "devices" / member).symlink_to(device)
    if vfio_node:
        (paths.dev / "vfio").mkdir(parents=True, exist_ok=True)
        paths.container.touch()
        paths.group_node(group).touch()
    return paths


def _config_space() -> bytearray:
    """The function's configuration space as vfio-pci's config region shows it."""
    config = bytearray(CONFIG_SIZE)
    struct.pack_into("<HHHH", config, 0, VENDOR, DEVICE, 0x0000, 0x0010)  # command, status: caps
    config[0x08:0x0C] = bytes([0x02, 0x02, 0x08, 0x01])  # revision, NVMe class 01:08:02
    struct.pack_into("<I", config, 0x10, 0x4)  # BAR0: 64-bit memory
    struct.pack_into("<I", config, 0x20, 0x0)  # BAR4: 32-bit memory
    struct.pack_into("<HH", config, 0x2C, 0x1AF4, 0x1100)
    config[0x34] = PM_CAP
    config[0x3D] = 1  # INTA
    config[PM_CAP : PM_CAP + 4] = bytes([0x01, MSI_CAP, 0x03, 0x00])
    config[MSI_CAP : MSI_CAP + 4] = bytes([0x05, MSIX_CAP, 0x80, 0x00])
    struct.pack_into("<BBHII", config, MSIX_CAP, 0x11, 0, MSIX_VECTORS - 1, MSIX_TABLE | 0, MSIX_PBA | 0)
    return config


@dataclass
class FakeFunction:
    """The fake device's regions and what was done to it."""

    bdf: str
    fd: int = -1
    resets: int = 0
    #: Interrupt index -> {vector: eventfd} as SET_IRQS left it (absent: disabled).
    irqs: dict[int, dict[int, int]] = field(default_factory=dict)
    intx_unmask_fd: int | None = None
    unmasks: int = 0
    sizes: dict[int, int] = field(
        default_factory=lambda: {0: BAR0_SIZE, 4: BAR4_SIZE, abi.VFIO_PCI_CONFIG_REGION_INDEX: CONFIG_SIZE}
    )

    def region_offset(self, index: int) -> int:
        return index * REGION_STRIDE

    def fire(self, index: int, vector: int) -> bool:
        """The device raises ``vector``: its bound eventfd is signalled, as the kernel would."""
        fd = self.irqs.get(index, {}).get(vector, -1)
        if fd < 0:
            return False
        os.eventfd_write(fd, 1)
        return True


class FakeVfioKernel:
    """Answers VFIO ioctls on fds it handed out; see the module docstring."""

    def __init__(
        self, paths: HostPaths, bdf: str, group: int, *, viable: bool = True, reset: bool = True
    ) -> None:
        self.paths = paths
        self.group_number = group
        self.viable = viable
        self.can_reset = reset
        self.function = FakeFunction(bdf)
        self._roles: dict[int, str] = {}
        self.container_of_group: int | None = None
        self.iommu_set = 0
        self.dma: dict[int, tuple[int, int]] = {}  # iova -> (size, vaddr)
        self.calls: list[str] = []
        #: (index, start, count) of every SET_IRQS.
        self.irq_sets: list[tuple[int, int, int]] = []

    # --- VfioKernel -------------------------------------------------------------------------
    def open(self, path: str) -> int:
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if path == str(self.paths.container):
            role = "container"
        elif path == str(self.paths.group_node(self.group_number)):
            if "group" in self._roles.values():
                raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), path)
            role = "group"
        else:
            raise OSError(errno.ENODEV, os.strerror(errno.ENODEV), path)
        fd = os.memfd_create(f"fake-vfio-{role}", os.MFD_CLOEXEC)
        self._roles[fd] = role
        return fd

    def ioctl(self, fd: int, request: int, arg: int | Buffer, name: str) -> int:
        self.calls.append(name)
        role = self._roles.get(fd)
        if role is None or (role == "device" and fd != self.function.fd):
            raise KvmError(name, errno.EBADF)
        handler = getattr(self, f"_{role}_{request - abi.VFIO_GET_API_VERSION}", None)
        if handler is None:
            raise KvmError(name, errno.ENOTTY)
        result: int = handler(fd, arg, name)
        return result

    def closed(self) -> list[str]:
        """Roles of the fds kvmpy has closed since they were handed out."""
        gone = []
        for fd, role in self._roles.items():
            try:
                os.fstat(fd)
            except OSError:
                gone.append(role)
        return gone

    # --- the container --------------------------------------------------------------------------
    def _container_0(self, fd: int, arg: int | Buffer, name: str) -> int:
        return abi.VFIO_API_VERSION

    def _container_1(self, fd: int, arg: int | Buffer, name: str) -> int:
        return 1 if arg in (abi.VFIO_TYPE1_IOMMU, abi.VFIO_TYPE1v2_IOMMU) else 0

    def _container_2(self, fd: int, arg: int | Buffer, name: str) -> int:
        if self.container_of_group != fd or arg not in (abi.VFIO_TYPE1_IOMMU, abi.VFIO_TYPE1v2_IOMMU):
            raise KvmError(name, errno.EINVAL)
        self.iommu_set = int(arg)  # type: ignore[arg-type]
        return 0

    def _container_13(self, fd: int, arg: int | Buffer, name: str) -> int:
        request = abi.vfio_iommu_type1_dma_map.from_buffer(_view(arg))
        if not self.iommu_set or request.argsz < ctypes.sizeof(request) or request.size == 0:
            raise KvmError(name, errno.EINVAL)
        for iova, (size, _) in self.dma.items():
            if iova < request.iova + request.size and request.iova < iova + size:
                raise KvmError(name, errno.EEXIST)
        self.dma[request.iova] = (request.size, request.vaddr)
        return 0

    def _container_14(self, fd: int, arg: int | Buffer, name: str) -> int:
        request = abi.vfio_iommu_type1_dma_unmap.from_buffer(_view(arg))
        if self.dma.get(request.iova, (None,))[0] != request.size:
            raise KvmError(name, errno.EINVAL)
        del self.dma[request.iova]
        return 0

    # --- the group ------------------------------------------------------------------------------
    def _group_3(self, fd: int, arg: int | Buffer, name: str) -> int:
        status = abi.vfio_group_status.from_buffer(_view(arg))
        status.flags = (abi.VFIO_GROUP_FLAGS_VIABLE if self.viable else 0) | (
            abi.VFIO_GROUP_FLAGS_CONTAINER_SET if self.container_of_group is not None else 0
        )
        return 0

    def _group_4(self, fd: int, arg: int | Buffer, name: str) -> int:
        container = ctypes.c_int32.from_buffer(_view(arg)).value
        if not self.viable or self._roles.get(container) != "container":
            raise KvmError(name, errno.EINVAL)
        self.container_of_group = container
        return 0

    def _group_5(self, fd: int, arg: int | Buffer, name: str) -> int:
        self.container_of_group = None
        self.iommu_set = 0
        self.dma.clear()
        return 0

    def _group_6(self, fd: int, arg: int | Buffer, name: str) -> int:
        requested = bytes(_view(arg)).split(b"\0")[0].decode()
        if requested != self.function.bdf or not self.iommu_set:
            raise KvmError(name, errno.EINVAL)
        self.function.fd = self._device_fd()
        return self.function.fd

    def _device_fd(self) -> int:
        fd = os.memfd_create("fake-vfio-device", os.MFD_CLOEXEC)
        os.ftruncate(fd, (abi.VFIO_PCI_NUM_REGIONS + 1) * REGION_STRIDE)
        os.pwrite(fd, bytes(_config_space()), self.function.region_offset(abi.VFIO_PCI_CONFIG_REGION_INDEX))
        self._roles[fd] = "device"
        return fd

    # --- the device -----------------------------------------------------------------------------
    def _device_7(self, fd: int, arg: int | Buffer, name: str) -> int:
        info = abi.vfio_device_info.from_buffer(_view(arg))
        info.flags = abi.VFIO_DEVICE_FLAGS_PCI | (abi.VFIO_DEVICE_FLAGS_RESET if self.can_reset else 0)
        info.num_regions, info.num_irqs = abi.VFIO_PCI_NUM_REGIONS, abi.VFIO_PCI_NUM_IRQS
        return 0

    def _device_8(self, fd: int, arg: int | Buffer, name: str) -> int:
        view = _view(arg)
        info = abi.vfio_region_info.from_buffer(view)
        if info.index >= abi.VFIO_PCI_NUM_REGIONS or info.index == abi.VFIO_PCI_VGA_REGION_INDEX:
            raise KvmError(name, errno.EINVAL)  # as vfio-pci answers for a device that is not VGA
        index = info.index
        size = self.function.sizes.get(index, 0)
        info.size, info.offset = size, self.function.region_offset(index)
        info.flags = abi.VFIO_REGION_INFO_FLAG_READ | abi.VFIO_REGION_INFO_FLAG_WRITE if size else 0
        if index != 0:
            return 0
        info.flags |= abi.VFIO_REGION_INFO_FLAG_MMAP | abi.VFIO_REGION_INFO_FLAG_CAPS
        areas = [(0, MSIX_TABLE)]  # the table and PBA pages left out, as older kernels do
        cap_size = ctypes.sizeof(abi.vfio_region_info_cap_sparse_mmap)
        needed = ctypes.sizeof(info) + cap_size + 16 * len(areas)
        given = info.argsz
        info.argsz = needed
        if given < needed:
            info.cap_offset = 0
            return 0
        info.cap_offset = ctypes.sizeof(info)
        del info
        header = abi.vfio_region_info_cap_sparse_mmap(nr_areas=len(areas))
        header.header.id, header.header.version = abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1
        base = ctypes.sizeof(abi.vfio_region_info)
        view[base : base + cap_size] = bytes(header)
        for number, (offset, length) in enumerate(areas):
            struct.pack_into("<QQ", view, base + cap_size + 16 * number, offset, length)
        return 0

    def _device_9(self, fd: int, arg: int | Buffer, name: str) -> int:
        info = abi.vfio_irq_info.from_buffer(_view(arg))
        if info.index == abi.VFIO_PCI_ERR_IRQ_INDEX:
            raise KvmError(name, errno.EINVAL)  # as vfio-pci answers for a device that is not PCIe
        info.count = {0: 1, 1: 1, abi.VFIO_PCI_MSIX_IRQ_INDEX: MSIX_VECTORS}.get(info.index, 0)
        info.flags = abi.VFIO_IRQ_INFO_EVENTFD | (abi.VFIO_IRQ_INFO_NORESIZE if info.index == 2 else 0)
        if info.index == abi.VFIO_PCI_INTX_IRQ_INDEX:
            info.flags |= abi.VFIO_IRQ_INFO_MASKABLE | abi.VFIO_IRQ_INFO_AUTOMASKED
        return 0

    def _device_10(self, fd: int, arg: int | Buffer, name: str) -> int:
        view = _view(arg)
        header = abi.vfio_irq_set.from_buffer_copy(view)
        self.irq_sets.append((header.index, header.start, header.count))
        limit = {0: 1, 1: 1, 2: MSIX_VECTORS}.get(header.index, 0)
        if header.start + header.count > limit or header.argsz != len(view):
            raise KvmError(name, errno.EINVAL)
        data, action = header.flags & 0x7, header.flags & 0x38
        disable = data == abi.VFIO_IRQ_SET_DATA_NONE and not header.count
        if action == abi.VFIO_IRQ_SET_ACTION_TRIGGER and disable:
            self.function.irqs.pop(header.index, None)
            return 0
        if action == abi.VFIO_IRQ_SET_ACTION_UNMASK and header.index == 0:
            if data == abi.VFIO_IRQ_SET_DATA_EVENTFD:
                self.function.intx_unmask_fd = struct.unpack_from("<i", view, ctypes.sizeof(header))[0]
            else:
                self.function.unmasks += 1
            return 0
        if action != abi.VFIO_IRQ_SET_ACTION_TRIGGER or data != abi.VFIO_IRQ_SET_DATA_EVENTFD:
            raise KvmError(name, errno.EINVAL)
        others = [index for index in self.function.irqs if index != header.index]
        if others:  # the kernel allows one interrupt type at a time
            raise KvmError(name, errno.EINVAL)
        fds = struct.unpack_from(f"<{header.count}i", view, ctypes.sizeof(header))
        vectors = self.function.irqs.setdefault(header.index, {})
        for offset, eventfd in enumerate(fds):
            vectors[header.start + offset] = eventfd
        return 0

    def _device_11(self, fd: int, arg: int | Buffer, name: str) -> int:
        if not self.can_reset:
            raise KvmError(name, errno.ENOTTY)
        self.function.resets += 1
        return 0


def _view(arg: int | Buffer) -> memoryview:
    if isinstance(arg, int):
        raise KvmError("fake VFIO ioctl", errno.EFAULT)
    return memoryview(arg).cast("B")


__all__ = ["FakeFunction", "FakeVfioKernel", "build_host_tree"]
