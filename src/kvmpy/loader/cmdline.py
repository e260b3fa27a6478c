"""The kernel command line, written where layout says, length checked."""

from __future__ import annotations

from kvmpy.arch.x86 import layout
from kvmpy.errors import ConfigError
from kvmpy.memory.guest_memory import GuestMemory


def write_cmdline(mem: GuestMemory, cmdline: str, limit: int = layout.CMDLINE_MAX_SIZE) -> int:
    """Write ``cmdline`` NUL-terminated at layout.CMDLINE_START; returns its address.

    The kernel gets the bytes the user gave: Python decodes argv as UTF-8 with surrogate
    escapes, and encoding the same way hands any byte typed on the command line over as typed.
    """
    try:
        data = cmdline.encode("utf-8", errors="surrogateescape") + b"\0"
    except UnicodeEncodeError as error:  # a lone surrogate from JSON, say: no bytes stand behind it
        why = f"{error.reason} at character {error.start}"
        raise ConfigError(f"kernel command line cannot be written as bytes: {why}") from None
    if len(data) > limit:
        raise ConfigError(f"kernel command line is {len(data) - 1} bytes, over the limit of {limit - 1}")
    mem.write(layout.CMDLINE_START, data)
    return layout.CMDLINE_START


__all__ = ["write_cmdline"]
