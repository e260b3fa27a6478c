"""Ports that are there so the guest finds something: the POST code port and quiet ranges.

Linux writes to port 0x80 as an I/O delay (``outb_p``), and probes legacy
ranges (parallel ports, the floppy controller, the second DMA controller,
VGA) that kvmpy does not emulate. Answering them as "nothing here" (reads
all-ones, writes dropped) without a log line keeps the log for accesses that
mean something, while the counters still show every exit they cost.
"""

from __future__ import annotations


class PostCode:
    """Port 0x80: remembers the last byte written (firmware POST code), reads it back."""

    def __init__(self) -> None:
        self.last_code = 0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes([self.last_code]) * len(data)

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.last_code = data[0]


class QuietPorts:
    """An absent device that does not complain: reads all-ones, writes dropped."""

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def write(self, offset: int, data: bytes) -> None:
        pass


__all__ = ["PostCode", "QuietPorts"]
