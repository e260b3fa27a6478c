"""QEMU's isa-debug-exit port: the guest writes a byte N and the VM ends with status N.

Test guests use it to report their result; the same binary run under QEMU
(``-device isa-debug-exit,iobase=0x501,iosize=2``) exits with ``(N << 1) | 1``.
"""

from __future__ import annotations

from collections.abc import Callable


class DebugExit:
    """Calls ``on_exit(code)`` when the guest writes to the port."""

    def __init__(self, on_exit: Callable[[int], None]) -> None:
        self._on_exit = on_exit

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and data:
            self._on_exit(data[0])


__all__ = ["DebugExit"]
