"""The kernel command line, written where layout says, length checked."""

from __future__ import annotations

from kvmpy.arch.x86 import layout
from kvmpy.errors import ConfigError
from kvmpy.memory.guest_memory import GuestMemory


def write_cmdline(mem: GuestMemory, cmdline: str, limit: int = layout.CMDLINE_MAX_SIZE) -> int:
    """Write ``cmdline`` NUL-terminated at layout.CMDLINE_START; returns its address."""
    data = cmdline.encode("utf-8") + b"\0"
    if len(data) > limit:
        raise ConfigError(f"kernel command line is {len(data) - 1} bytes, over the limit of {limit - 1}")
    mem.write(layout.CMDLINE_START, data)
    return layout.CMDLINE_START


__all__ = ["write_cmdline"]
