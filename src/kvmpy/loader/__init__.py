"""Kernel loaders: turn a file into guest memory contents and a boot vCPU state.

``load_kernel`` recognises the format (ELF with a PVH note, Linux bzImage,
or a flat binary when an address is given) and returns a :class:`BootSetup`
the machine builder turns into registers.
"""

from __future__ import annotations

from pathlib import Path

from kvmpy.errors import ConfigError
from kvmpy.loader.boot_setup import BootMode, BootSetup
from kvmpy.memory.guest_memory import GuestMemory, GuestMemoryError

_HEADER_BYTES = 0x400


def load_kernel(
    mem: GuestMemory,
    kernel: Path,
    *,
    initrd: Path | None = None,
    cmdline: str = "",
    flat_address: int | None = None,
    rsdp_address: int = 0,
) -> BootSetup:
    """Load ``kernel`` (and ``initrd``/``cmdline``) into ``mem``."""
    from kvmpy.loader import bzimage, elf

    try:
        data = kernel.read_bytes()
    except OSError as error:
        raise ConfigError(f"kernel {kernel} cannot be read: {error.strerror}") from None
    if flat_address is not None:
        return _load_flat(mem, kernel, data, flat_address)
    if elf.is_elf(data[:_HEADER_BYTES]):
        return elf.load_elf(mem, kernel, data, initrd=initrd, cmdline=cmdline, rsdp_address=rsdp_address)
    if bzimage.is_bzimage(data[:_HEADER_BYTES]):
        return bzimage.load_bzimage(
            mem, kernel, data, initrd=initrd, cmdline=cmdline, rsdp_address=rsdp_address
        )
    raise ConfigError(f"kernel {kernel} is neither an ELF with a PVH note nor a bzImage")


def _load_flat(mem: GuestMemory, kernel: Path, data: bytes, address: int) -> BootSetup:
    try:
        mem.write(address, data)
    except GuestMemoryError:
        raise ConfigError(
            f"flat binary {kernel} ({len(data)} bytes) does not fit in guest RAM at {address:#x}"
        ) from None
    return BootSetup(
        entry=address,
        mode=BootMode.FLAT64,
        boot_info=0,
        kernel_end=address + len(data),
        description=f"flat binary at {address:#x}",
    )


__all__ = ["BootMode", "BootSetup", "load_kernel"]
