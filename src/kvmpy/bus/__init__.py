"""Buses and the device interface."""

from kvmpy.bus.bus import AccessCounter, Bus, BusAccessStats, BusDispatcher, BusOverlapError, BusRange
from kvmpy.bus.device import BusDevice, InterruptLine, NullInterruptLine

__all__ = [
    "AccessCounter",
    "Bus",
    "BusAccessStats",
    "BusDispatcher",
    "BusDevice",
    "BusOverlapError",
    "BusRange",
    "InterruptLine",
    "NullInterruptLine",
]
