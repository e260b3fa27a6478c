"""Where a PCI device's IOMMU group and driver are, and what to tell a user when they are wrong.

The roots of /sys and /dev are parameters (:class:`HostPaths`), so tests build a fake tree
under a temporary directory and check each message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from kvmpy.errors import ConfigError, HostError

_BDF = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
VFIO_DRIVER = "vfio-pci"


def parse_bdf(text: str, field: str = "vfio") -> str:
    """``[DDDD:]BB:DD.F`` -> the canonical ``DDDD:BB:DD.F`` sysfs uses; ConfigError otherwise.

    ``field`` names the value in the error: ``vfio`` for --device, ``host_bdf`` for the API."""
    match = _BDF.match(text.strip())
    if match is None:
        raise ConfigError(f"{field}={text!r}: not a PCI address; give it as DDDD:BB:DD.F, e.g. 0000:00:04.0")
    domain, bus, device, function = match.groups()
    if int(device, 16) > 0x1F:
        raise ConfigError(f"{field}={text!r}: PCI device number {device} is above 1f")
    return f"{(domain or '0000').lower()}:{bus.lower()}:{device.lower()}.{function}"


@dataclass(frozen=True, slots=True)
class HostPaths:
    """The host's /sys and /dev (a temporary tree in tests)."""

    sys: Path = Path("/sys")
    dev: Path = Path("/dev")

    @property
    def container(self) -> Path:
        return self.dev / "vfio" / "vfio"

    def group_node(self, group: int) -> Path:
        return self.dev / "vfio" / str(group)

    def device(self, bdf: str) -> Path:
        return self.sys / "bus" / "pci" / "devices" / bdf

    def group_devices(self, group: int) -> Path:
        return self.sys / "kernel" / "iommu_groups" / str(group) / "devices"


def driver_of(paths: HostPaths, bdf: str) -> str | None:
    """The name of the host driver bound to ``bdf``, or None if none is."""
    link = paths.device(bdf) / "driver"
    return link.resolve().name if link.exists() else None


def iommu_group(paths: HostPaths, bdf: str) -> int:
    """The IOMMU group of ``bdf``: checks, in the order a user would fix them, that the device
    exists, that the host has VFIO and an IOMMU, and that vfio-pci drives the device."""
    device = paths.device(bdf)
    if not device.exists():
        raise ConfigError(f"vfio={bdf}: no such PCI device ({device} is missing; see lspci -D)")
    if not paths.container.exists():
        raise HostError(
            f"vfio={bdf}: {paths.container} is missing: load the vfio-pci module (modprobe vfio-pci)"
        )
    link = device / "iommu_group"
    if not link.exists():
        raise HostError(
            f"vfio={bdf}: the device has no IOMMU group: the host has no IOMMU or it is off"
            " (boot with intel_iommu=on or amd_iommu=on, and enable VT-d/AMD-Vi in firmware)"
        )
    driver = driver_of(paths, bdf)
    if driver != VFIO_DRIVER:
        bound = f"is bound to {driver}" if driver else "has no driver"
        raise ConfigError(
            f"vfio={bdf}: the device {bound}, not vfio-pci: echo vfio-pci > {device}/driver_override"
            + (f"; echo {bdf} > {device}/driver/unbind" if driver else "")
            + f"; echo {bdf} > {paths.sys}/bus/pci/drivers_probe"
        )
    return int(link.resolve().name)


def unviable_members(paths: HostPaths, group: int) -> list[tuple[str, str]]:
    """The devices of ``group`` whose driver keeps it from being viable: (address, driver).

    A group is viable when every member is bound to a VFIO driver or to none (vfio.rst);
    PCI bridges bound to pcieport are also allowed by the kernel."""
    directory = paths.group_devices(group)
    members = sorted(entry.name for entry in directory.iterdir()) if directory.exists() else []
    found = []
    for member in members:
        driver = driver_of(paths, member)
        if driver is not None and driver != VFIO_DRIVER and driver != "pcieport":
            found.append((member, driver))
    return found


__all__ = ["HostPaths", "driver_of", "iommu_group", "parse_bdf", "unviable_members"]
