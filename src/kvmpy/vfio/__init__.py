"""The host side of device assignment: Linux VFIO's container, group and device.

One component per file: :mod:`.kernel` (how ioctls reach the kernel, replaceable by a
fake), :mod:`.sysfs` (where a PCI device's IOMMU group and driver are found, and the
errors a user can act on), :mod:`.container`, :mod:`.group`, :mod:`.device`, and
:mod:`.assign`, which opens all three for one PCI address. Nothing here knows KVM: the
guest-visible function is in kvmpy.devices.vfio.
"""

from kvmpy.vfio.assign import Assignment, assign
from kvmpy.vfio.container import Container, DmaMapping
from kvmpy.vfio.device import IrqInfo, RegionInfo, VfioDevice
from kvmpy.vfio.group import Group
from kvmpy.vfio.kernel import KernelVfio, VfioKernel
from kvmpy.vfio.sysfs import HostPaths, parse_bdf

__all__ = [
    "Assignment",
    "Container",
    "DmaMapping",
    "Group",
    "HostPaths",
    "IrqInfo",
    "KernelVfio",
    "RegionInfo",
    "VfioDevice",
    "VfioKernel",
    "assign",
    "parse_bdf",
]
