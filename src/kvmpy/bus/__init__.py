"""Buses and the device interface."""

from kvmpy.bus.bus import Bus, BusAccessStats, BusOverlapError, BusRange
from kvmpy.bus.device import BusDevice, InterruptLine, NullInterruptLine

__all__ = [
    "Bus",
    "BusAccessStats",
    "BusDevice",
    "BusOverlapError",
    "BusRange",
    "InterruptLine",
    "NullInterruptLine",
]
