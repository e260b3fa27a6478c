"""The host bridge at 00:00.0: a function with no BARs that says "this is PCI bus 0"."""

from __future__ import annotations

from kvmpy.bus import BusDevice
from kvmpy.devices.pci.config_space import PciConfigSpace

#: Red Hat's vendor ID for generic virtual hardware, and its PCIe host bridge device ID.
VENDOR_REDHAT = 0x1B36
DEVICE_HOST_BRIDGE = 0x0008
CLASS_HOST_BRIDGE = 0x060000


class HostBridge:
    def __init__(self) -> None:
        self.config = PciConfigSpace(
            vendor_id=VENDOR_REDHAT, device_id=DEVICE_HOST_BRIDGE, class_code=CLASS_HOST_BRIDGE
        )

    def bar_device(self, index: int) -> BusDevice | None:
        return None

    def bar_mapped(self, index: int, address: int | None) -> None:
        pass

    def config_written(self, offset: int, size: int) -> None:
        pass


__all__ = ["HostBridge"]
