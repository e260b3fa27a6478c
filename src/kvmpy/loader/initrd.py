"""Placing the initial ramdisk: page aligned, as high as allowed, above the kernel."""

from __future__ import annotations

from pathlib import Path

from kvmpy.errors import ConfigError
from kvmpy.memory.guest_memory import GuestMemory

PAGE = 4096


def load_initrd(mem: GuestMemory, path: Path, *, lowest: int, highest: int) -> tuple[int, int]:
    """Copy ``path`` into RAM ending at or below ``highest`` and starting at or above
    ``lowest``; returns ``(address, size)``."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"initrd {path} cannot be read: {error.strerror}") from None
    size = len(data)
    for region in sorted(mem.regions, key=lambda r: -r.gpa):
        top = min(region.end, highest)
        address = (top - size) & ~(PAGE - 1)
        if address >= max(region.gpa, lowest):
            mem.write(address, data)
            return address, size
    raise ConfigError(
        f"initrd {path} ({size >> 20} MiB) does not fit in guest RAM between "
        f"{lowest:#x} and {highest:#x}: give the VM more --memory"
    )


__all__ = ["load_initrd"]
