"""Open everything one assigned PCI device needs, in the order vfio.rst gives, and undo it.

container -> group (viable?) -> group joins container -> IOMMU model set -> guest RAM
mapped for DMA (IOVA = GPA) -> device fd -> regions and interrupts -> reset.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvmpy.errors import HostError
from kvmpy.kvm.errors import KvmError
from kvmpy.vfio.container import Container
from kvmpy.vfio.device import VfioDevice
from kvmpy.vfio.group import Group
from kvmpy.vfio.kernel import KernelVfio, VfioKernel
from kvmpy.vfio.sysfs import HostPaths, iommu_group, parse_bdf


@dataclass
class Assignment:
    """One device's container, group and device fd, held until the VM ends."""

    bdf: str
    container: Container
    group: Group
    device: VfioDevice

    def close(self) -> None:
        """Reset the device (so the next user finds it clean), then let go of all three."""
        try:
            if self.device.fd >= 0:
                self.device.reset()
        except KvmError:
            pass  # a device that cannot reset now is still released
        self.device.close()
        self.group.close()
        self.container.close()


def assign(
    address: str,
    ram: Iterable[tuple[int, int, int]],
    *,
    kernel: VfioKernel | None = None,
    paths: HostPaths | None = None,
) -> Assignment:
    """Open ``address`` for assignment with every ``(gpa, size, host address)`` of guest RAM
    mapped for its DMA; the device is reset before the guest sees it."""
    kernel = kernel or KernelVfio()
    paths = paths or HostPaths()
    bdf = parse_bdf(address)
    number = iommu_group(paths, bdf)
    try:
        container = Container(kernel, str(paths.container))
    except (OSError, KvmError) as error:
        raise HostError(f"vfio={bdf}: opening {paths.container}: {error}") from None
    group: Group | None = None
    try:
        group = Group(kernel, paths, number, bdf)
        group.attach(container)
        container.set_iommu()
        for gpa, size, host_address in ram:
            container.map_dma(gpa, size, host_address)
        device = VfioDevice(kernel, group.device_fd(bdf), bdf)
        device.reset()
    except KvmError as error:
        _undo(group, container)
        raise HostError(f"vfio={bdf}: {error}") from None
    except BaseException:
        _undo(group, container)
        raise
    return Assignment(bdf, container, group, device)


def _undo(group: Group | None, container: Container) -> None:
    if group is not None:
        group.close()
    container.close()


__all__ = ["Assignment", "assign"]
