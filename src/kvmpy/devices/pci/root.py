"""PCI bus 0: configuration access (mechanism #1 and ECAM) and BAR placement on the buses.

Devices sit in slots of bus 0, function 0. The root answers configuration
cycles for empty slots with all-ones (what "no device" looks like), and
whenever a guest write moves a BAR or toggles decoding, it moves the BAR's
registration on the PIO or MMIO bus. A BAR the guest points at RAM or at
another device is left unmapped, logged once and counted: the guest only
hurts itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from kvmpy.bus import Bus, BusDevice, BusOverlapError, BusRange
from kvmpy.devices.pci.config_space import NUM_BARS, PciConfigSpace
from kvmpy.ratelimit import guest_log

log = logging.getLogger("kvmpy.pci")

MAX_SLOTS = 32
ENABLE_BIT = 1 << 31


class PciFunction(Protocol):
    """What the root needs from a device: its config space and its BAR handlers."""

    config: PciConfigSpace

    def bar_device(self, index: int) -> BusDevice | None: ...

    def bar_mapped(self, index: int, address: int | None) -> None: ...

    def config_written(self, offset: int, size: int) -> None: ...


class PciRoot:
    """Bus 0 and its configuration mechanisms."""

    def __init__(self, pio_bus: Bus, mmio_bus: Bus, is_ram: Callable[[int, int], bool]) -> None:
        self._pio = pio_bus
        self._mmio = mmio_bus
        self._is_ram = is_ram
        self.slots: list[PciFunction | None] = [None] * MAX_SLOTS
        self._mapped: dict[tuple[int, int], BusRange] = {}
        self._names: dict[int, str] = {}
        self.refused_bars = 0

    def add(self, function: PciFunction, slot: int | None = None, name: str = "pci") -> int:
        if slot is None:
            slot = next(i for i, f in enumerate(self.slots) if f is None)
        if self.slots[slot] is not None:
            raise ValueError(f"PCI slot {slot} is taken")
        self.slots[slot] = function
        function.config.on_bar_change = lambda _index, s=slot: self._update_bars(s)
        function.config.on_write = lambda offset, size, s=slot: self._after_write(s, offset, size)
        self._names[slot] = name
        self._update_bars(slot)
        return slot

    def slot_name(self, slot: int) -> str:
        """The name the function in ``slot`` was added with (its bus ranges carry it too)."""
        return self._names.get(slot, "pci")

    def slot_of(self, function: PciFunction) -> int:
        return self.slots.index(function)

    def refresh(self, slot: int) -> None:
        """Place ``slot``'s BARs where its (restored) configuration space says: the wiring
        comes from the state, whatever this process mapped before."""
        self._update_bars(slot)

    # --- configuration access ----------------------------------------------------------
    def config_read(self, bus: int, slot: int, function: int, offset: int, size: int) -> int:
        target = self._function(bus, slot, function)
        if target is None:
            return (1 << (8 * size)) - 1
        return target.config.read(offset, size)

    def config_write(self, bus: int, slot: int, function: int, offset: int, size: int, value: int) -> None:
        target = self._function(bus, slot, function)
        if target is not None:
            target.config.write(offset, size, value)

    def _function(self, bus: int, slot: int, function: int) -> PciFunction | None:
        if bus != 0 or function != 0 or not 0 <= slot < MAX_SLOTS:
            return None
        return self.slots[slot]

    # --- BAR placement -----------------------------------------------------------------
    def _after_write(self, slot: int, offset: int, size: int) -> None:
        if offset <= 0x04 < offset + size or offset <= 0x05 < offset + size:  # the command register
            self._update_bars(slot)
        function = self.slots[slot]
        if function is not None:
            function.config_written(offset, size)

    def _update_bars(self, slot: int) -> None:
        function = self.slots[slot]
        if function is None:
            return
        config = function.config
        for index in range(NUM_BARS):
            bar = config.bars[index]
            if bar is None:
                continue
            wanted = config.bar_address(index) if config.bar_enabled(index) else None
            current = self._mapped.get((slot, index))
            if current is not None and current.base == wanted:
                continue
            if current is not None:
                (self._pio if bar.is_io else self._mmio).unregister(current)
                del self._mapped[(slot, index)]
                function.bar_mapped(index, None)
            if wanted is not None:
                self._map(slot, index, wanted, function)

    def _map(self, slot: int, index: int, address: int, function: PciFunction) -> None:
        bar = function.config.bars[index]
        device = function.bar_device(index)
        assert bar is not None
        if device is None:
            return
        name = f"{self._names.get(slot, 'pci')} BAR{index}"
        if not bar.is_io and self._overlaps_ram(address, bar.size):
            self._refuse(name, address, "it overlaps guest RAM")
            return
        bus = self._pio if bar.is_io else self._mmio
        try:
            self._mapped[(slot, index)] = bus.register(address, bar.size, device, name)
        except BusOverlapError as error:
            self._refuse(name, address, str(error))
            return
        function.bar_mapped(index, address)

    def _overlaps_ram(self, address: int, size: int) -> bool:
        """Whether any byte of the range is RAM, not only all of it (a BAR half over RAM is over RAM).

        Checking both ends is enough for kvmpy's layout: RAM regions are at least as large
        and as aligned as a BAR (pages against BARs of at most a few pages, naturally
        aligned), so no region can lie strictly inside a BAR with neither end in RAM.
        """
        return self._is_ram(address, 1) or self._is_ram(address + size - 1, 1)

    def _refuse(self, name: str, address: int, why: str) -> None:
        self.refused_bars += 1
        message = "guest placed %s at %#x but %s: left unmapped"
        guest_log.warning(log, ("refused-bar", name), message, name, address, why)


class ConfigMechanism1:
    """Ports 0xCF8 (address) and 0xCFC-0xCFF (data): PC configuration mechanism #1."""

    def __init__(self, root: PciRoot) -> None:
        self._root = root
        self._address = 0

    def _target(self) -> tuple[int, int, int, int] | None:
        if not self._address & ENABLE_BIT:
            return None
        a = self._address
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, a & 0xFC

    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if offset == 0 and size == 4:
            data[:] = self._address.to_bytes(4, "little")
            return
        target = self._target()
        if offset < 4 or target is None or (offset - 4) + size > 4:
            data[:] = b"\xff" * size
            return
        bus, slot, function, register = target
        value = self._root.config_read(bus, slot, function, register + offset - 4, size)
        data[:] = value.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        value = int.from_bytes(data, "little")
        if offset == 0 and size == 4:
            self._address = value & 0x80FF_FFFC
            return
        target = self._target()
        if offset < 4 or target is None or (offset - 4) + size > 4:
            return
        bus, slot, function, register = target
        self._root.config_write(bus, slot, function, register + offset - 4, size, value)


class Ecam:
    """PCIe enhanced configuration access: config space mapped in MMIO (described by MCFG)."""

    def __init__(self, root: PciRoot) -> None:
        self._root = root

    @staticmethod
    def _decode(offset: int) -> tuple[int, int, int, int]:
        return (offset >> 20) & 0xFF, (offset >> 15) & 0x1F, (offset >> 12) & 0x7, offset & 0xFFF

    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        bus, slot, function, register = self._decode(offset)
        if size not in (1, 2, 4) or register % size:
            data[:] = b"\xff" * size
            return
        data[:] = self._root.config_read(bus, slot, function, register, size).to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        bus, slot, function, register = self._decode(offset)
        if size in (1, 2, 4) and not register % size:
            self._root.config_write(bus, slot, function, register, size, int.from_bytes(data, "little"))


__all__ = ["ConfigMechanism1", "Ecam", "PciFunction", "PciRoot"]
