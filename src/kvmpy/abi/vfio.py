"""The kernel's VFIO interface (<linux/vfio.h>): containers, groups, devices, type-1 IOMMU.

A container (/dev/vfio/vfio) holds an IOMMU context; groups (/dev/vfio/N, one per IOMMU
group) join it; a device fd comes from its group and exposes regions (config space, BARs,
ROM) at fixed offsets and interrupts that are bound to eventfds. Every VFIO ioctl is
``_IO(';', 100 + n)``: the argument size is not encoded, each structure starts with its
own ``argsz``. Written from the UAPI header and Documentation/driver-api/vfio.rst;
tests/test_abi_vfio.py checks sizes, offsets and numbers against the installed header.
"""

from __future__ import annotations

import ctypes

VFIO_API_VERSION = 0
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3

_VFIO_TYPE = ord(";")
_VFIO_BASE = 100


def _io(number: int) -> int:
    """``_IO(VFIO_TYPE, VFIO_BASE + number)``: direction and size bits are zero."""
    return (_VFIO_TYPE << 8) | (_VFIO_BASE + number)


# --- ioctls on the container, the group and the device -----------------------------------
VFIO_GET_API_VERSION = _io(0)
VFIO_CHECK_EXTENSION = _io(1)
VFIO_SET_IOMMU = _io(2)
VFIO_GROUP_GET_STATUS = _io(3)
VFIO_GROUP_SET_CONTAINER = _io(4)
VFIO_GROUP_UNSET_CONTAINER = _io(5)
VFIO_GROUP_GET_DEVICE_FD = _io(6)
VFIO_DEVICE_GET_INFO = _io(7)
VFIO_DEVICE_GET_REGION_INFO = _io(8)
VFIO_DEVICE_GET_IRQ_INFO = _io(9)
VFIO_DEVICE_SET_IRQS = _io(10)
VFIO_DEVICE_RESET = _io(11)
VFIO_IOMMU_GET_INFO = _io(12)
VFIO_IOMMU_MAP_DMA = _io(13)
VFIO_IOMMU_UNMAP_DMA = _io(14)

# --- flags ---------------------------------------------------------------------------------
VFIO_GROUP_FLAGS_VIABLE = 1 << 0
VFIO_GROUP_FLAGS_CONTAINER_SET = 1 << 1

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_DEVICE_FLAGS_CAPS = 1 << 7

VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3

VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_AUTOMASKED = 1 << 2
VFIO_IRQ_INFO_NORESIZE = 1 << 3

VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5

VFIO_DMA_MAP_FLAG_READ = 1 << 0
VFIO_DMA_MAP_FLAG_WRITE = 1 << 1
VFIO_IOMMU_INFO_PGSIZES = 1 << 0

# --- vfio-pci's fixed region and interrupt indexes -------------------------------------------
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_VGA_REGION_INDEX = 8
VFIO_PCI_NUM_REGIONS = 9

VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5


# --- structures ------------------------------------------------------------------------------
class vfio_info_cap_header(ctypes.Structure):
    _fields_ = [("id", ctypes.c_uint16), ("version", ctypes.c_uint16), ("next", ctypes.c_uint32)]


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_device_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("num_regions", ctypes.c_uint32),
        ("num_irqs", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
    ]


class vfio_region_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("cap_offset", ctypes.c_uint32),
        ("size", ctypes.c_uint64),
        ("offset", ctypes.c_uint64),
    ]


class vfio_region_sparse_mmap_area(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class vfio_region_info_cap_sparse_mmap(ctypes.Structure):
    """Followed by ``nr_areas`` :class:`vfio_region_sparse_mmap_area` entries."""

    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_areas", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class vfio_irq_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_irq_set(ctypes.Structure):
    """Followed by ``count`` data items (s32 eventfds or u8 booleans), per ``flags``."""

    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("index", ctypes.c_uint32),
        ("start", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
    ]


class vfio_iommu_type1_info(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova_pgsizes", ctypes.c_uint64),
        ("cap_offset", ctypes.c_uint32),
    ]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("vaddr", ctypes.c_uint64),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    _fields_ = [
        ("argsz", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("iova", ctypes.c_uint64),
        ("size", ctypes.c_uint64),
    ]


def make_irq_set_eventfds(index: int, start: int, fds: list[int]) -> ctypes.Array[ctypes.c_char]:
    """A ``vfio_irq_set`` that binds (fd >= 0) or unbinds (fd == -1) ``fds`` to vectors
    ``start..``: the variable-length tail makes it a byte buffer, not a Structure."""
    header = vfio_irq_set(
        argsz=ctypes.sizeof(vfio_irq_set) + 4 * len(fds),
        flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
        index=index,
        start=start,
        count=len(fds),
    )
    tail = (ctypes.c_int32 * len(fds))(*fds)
    return ctypes.create_string_buffer(bytes(header) + bytes(tail), header.argsz)


def make_irq_set_none(index: int, start: int, count: int, action: int) -> vfio_irq_set:
    """A ``vfio_irq_set`` without data: ``count`` 0 with TRIGGER disables the whole index."""
    return vfio_irq_set(
        argsz=ctypes.sizeof(vfio_irq_set),
        flags=VFIO_IRQ_SET_DATA_NONE | action,
        index=index,
        start=start,
        count=count,
    )


#: Structures whose layout tests/test_abi_vfio.py checks against the C compiler.
STRUCTS = (
    vfio_info_cap_header,
    vfio_group_status,
    vfio_device_info,
    vfio_region_info,
    vfio_region_sparse_mmap_area,
    vfio_region_info_cap_sparse_mmap,
    vfio_irq_info,
    vfio_irq_set,
    vfio_iommu_type1_info,
    vfio_iommu_type1_dma_map,
    vfio_iommu_type1_dma_unmap,
)

assert VFIO_GET_API_VERSION == 0x3B64
assert VFIO_IOMMU_MAP_DMA == 0x3B71

__all__ = [name for name in dict(globals()) if name.startswith(("VFIO_", "vfio_", "make_"))]
