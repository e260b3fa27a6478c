"""The interface every bus device implements, and how it raises interrupts.

Devices see offsets relative to the start of the range they are registered at,
never absolute addresses, and never import anything from ``kvmpy.kvm``: the
machine builder hands them an :class:`InterruptLine` that hides whether the
interrupt ends up in KVM's in-kernel irqchip, an irqfd, or a test fake.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class BusDevice(Protocol):
    """A device reached through port I/O or MMIO.

    ``read`` fills ``data`` (1, 2, 4 or 8 bytes, little-endian) with the value
    at ``offset``; ``write`` receives the bytes the guest wrote. Both must
    tolerate any offset and any size inside the registered range: the guest is
    hostile, and odd accesses are answered, never raised on.
    """

    def read(self, offset: int, data: memoryview) -> None: ...

    def write(self, offset: int, data: bytes) -> None: ...


class InterruptLine(Protocol):
    """One interrupt wire from a device to the interrupt controller.

    ``set_level(True)`` asserts the line, ``set_level(False)`` deasserts it.
    Edge-triggered consumers see the rising edge; level-triggered ones see the
    level. ``pulse`` is an assert followed by a deassert.
    """

    def set_level(self, high: bool) -> None: ...

    def pulse(self) -> None: ...


class NullInterruptLine:
    """An interrupt line that goes nowhere (for devices wired without an IRQ)."""

    def set_level(self, high: bool) -> None:
        pass

    def pulse(self) -> None:
        pass


__all__ = ["BusDevice", "InterruptLine", "NullInterruptLine"]
