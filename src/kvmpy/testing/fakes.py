"""Test doubles shipped with kvmpy, for its own tests and for anyone writing a device."""

from __future__ import annotations


class RecordingInterruptLine:
    """An InterruptLine that remembers every level it was driven to."""

    def __init__(self) -> None:
        self.levels: list[bool] = []

    @property
    def level(self) -> bool:
        return self.levels[-1] if self.levels else False

    def set_level(self, high: bool) -> None:
        self.levels.append(high)

    def pulse(self) -> None:
        self.levels += [True, False]


class PortAccessor:
    """Byte-wide register access to a bus device, as a guest driver would do it."""

    def __init__(self, device: object) -> None:
        self.device = device

    def inb(self, offset: int) -> int:
        data = bytearray(1)
        self.device.read(offset, memoryview(data))  # type: ignore[attr-defined]
        return data[0]

    def outb(self, offset: int, value: int) -> None:
        self.device.write(offset, bytes([value]))  # type: ignore[attr-defined]


__all__ = ["PortAccessor", "RecordingInterruptLine"]
