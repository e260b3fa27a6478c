"""What a loader hands the machine builder: where and how the boot vCPU starts."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class BootMode(Enum):
    #: 32-bit protected mode, paging off, EBX = hvm_start_info (the PVH boot ABI).
    PVH = "pvh"
    #: 64-bit long mode with identity paging, RSI = zero page (Linux boot protocol).
    LINUX64 = "linux64"
    #: 64-bit long mode with identity paging, no boot information (flat binaries).
    FLAT64 = "flat64"


@dataclass(frozen=True, slots=True)
class BootSetup:
    entry: int
    mode: BootMode
    boot_info: int
    kernel_end: int
    description: str


__all__ = ["BootMode", "BootSetup"]
