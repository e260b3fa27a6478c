"""Assigned devices: a VFIO device as a function on kvmpy's PCI bus (see :mod:`.function`)."""

from kvmpy.devices.vfio.config import AssignedConfigSpace
from kvmpy.devices.vfio.function import AssignedFunction

__all__ = ["AssignedConfigSpace", "AssignedFunction"]
