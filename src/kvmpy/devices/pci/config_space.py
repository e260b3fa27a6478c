"""A PCI function's configuration space: identity, BARs, capabilities, with write masks.

Every byte has a write mask, so the guest can only change what hardware would
let it change: BAR sizing (write all-ones, read back the size mask) falls out
of the masks, read-only identity fields stay put, and odd-sized or
out-of-range accesses are answered without ever raising.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

CONFIG_SIZE = 4096  # PCIe extended space; the legacy mechanism reaches the first 256 bytes

VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION = 0x08
CLASS_CODE = 0x09  # programming interface, subclass, class (3 bytes)
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = (
    COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | (1 << 6) | (1 << 8) | COMMAND_INTX_DISABLE
)
STATUS_CAPABILITIES = 1 << 4

BAR_IO = 0x1
BAR_MEM64 = 0x4
BAR_PREFETCH = 0x8
FIRST_CAPABILITY = 0x40
NUM_BARS = 6


class BarKind(Enum):
    IO = "io"
    MEM32 = "mem32"
    MEM64 = "mem64"


@dataclass(frozen=True, slots=True)
class Bar:
    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    @property
    def is_io(self) -> bool:
        return self.kind is BarKind.IO


@dataclass(frozen=True, slots=True)
class PciConfigState:
    """The whole configuration space; only the bits the guest could write are taken back."""

    data: bytes


class PciConfigSpace:
    """Configuration registers of one function, with per-byte write masks."""

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        interrupt_pin: int = 0,
    ) -> None:
        self._data = bytearray(CONFIG_SIZE)
        self._mask = bytearray(CONFIG_SIZE)
        self.bars: list[Bar | None] = [None] * NUM_BARS
        self._last_capability = CAPABILITIES_POINTER
        self._next_capability = FIRST_CAPABILITY
        struct.pack_into("<HH", self._data, VENDOR_ID, vendor_id, device_id)
        self._data[REVISION] = revision
        self._data[CLASS_CODE : CLASS_CODE + 3] = class_code.to_bytes(3, "little")
        struct.pack_into("<HH", self._data, SUBSYSTEM_VENDOR_ID, subsystem_vendor_id, subsystem_id)
        self._data[INTERRUPT_PIN] = interrupt_pin
        self._set_mask(COMMAND, 2, COMMAND_WRITABLE)
        self._set_mask(INTERRUPT_LINE, 1, 0xFF)
        #: Called with the BAR index when a BAR's address changes.
        self.on_bar_change: Callable[[int], None] | None = None
        #: Called with (offset, size) after any guest write, for capability logic.
        self.on_write: Callable[[int, int], None] | None = None

    # --- building -------------------------------------------------------------------
    def _set_mask(self, offset: int, size: int, mask: int) -> None:
        self._mask[offset : offset + size] = mask.to_bytes(size, "little")

    def add_bar(self, bar: Bar, address: int) -> None:
        """Declare BAR ``bar.index`` (size a power of two) at ``address``."""
        if bar.size & (bar.size - 1) or bar.size < (4 if bar.is_io else 16):
            raise ValueError(f"BAR size {bar.size:#x} is not a power of two of the minimum size")
        offset = BAR0 + 4 * bar.index
        self.bars[bar.index] = bar
        if bar.kind is BarKind.IO:
            low_flags, mask = BAR_IO, ~(bar.size - 1) & 0xFFFF_FFFC
        else:
            low_flags = (BAR_MEM64 if bar.kind is BarKind.MEM64 else 0) | (
                BAR_PREFETCH if bar.prefetchable else 0
            )
            mask = ~(bar.size - 1) & 0xFFFF_FFF0
        struct.pack_into("<I", self._data, offset, (address & mask) | low_flags)
        self._set_mask(offset, 4, mask)
        if bar.kind is BarKind.MEM64:
            high_mask = (~(bar.size - 1) >> 32) & 0xFFFF_FFFF
            struct.pack_into("<I", self._data, offset + 4, address >> 32)
            self._set_mask(offset + 4, 4, high_mask)

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """Append a capability (``body`` follows the ID and next-pointer bytes); returns its offset."""
        offset = self._next_capability
        length = 2 + len(body)
        if offset + length > 0x100:
            raise ValueError("capabilities overflow the legacy configuration space")
        self._data[offset] = cap_id
        self._data[offset + 1] = 0
        self._data[offset + 2 : offset + length] = body
        if writable is not None:
            self._mask[offset + 2 : offset + 2 + len(writable)] = writable
        self._data[self._last_capability + (0 if self._last_capability == CAPABILITIES_POINTER else 1)] = (
            offset
        )
        self._last_capability = offset
        self._data[STATUS] |= STATUS_CAPABILITIES
        self._next_capability = (offset + length + 3) & ~3
        return offset

    # --- guest access -----------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SIZE:
            return (1 << (8 * max(size, 0))) - 1 if 0 < size <= 8 else 0xFFFF_FFFF
        return int.from_bytes(self._data[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SIZE:
            return
        bars_before = [self.bar_address(i) for i in range(NUM_BARS)]
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            mask = self._mask[offset + i]
            self._data[offset + i] = (self._data[offset + i] & ~mask) | (byte & mask)
        if offset < BAR0 + 4 * NUM_BARS and offset + size > BAR0 and self.on_bar_change is not None:
            for index, before in enumerate(bars_before):
                if self.bars[index] is not None and self.bar_address(index) != before:
                    self.on_bar_change(index)
        if self.on_write is not None:
            self.on_write(offset, size)

    # --- state ------------------------------------------------------------------------
    def save(self) -> PciConfigState:
        return PciConfigState(bytes(self._data))

    def restore(self, state: PciConfigState) -> None:
        """Take the guest-writable bits of ``state``; the read-only ones must be what this
        function has (the same device, capabilities and BAR sizes), else ValueError.

        BAR placement follows from the restored BAR registers; the caller (the PCI root)
        maps them again, so no write callback runs here.
        """
        if len(state.data) != CONFIG_SIZE:
            raise ValueError(f"saved PCI configuration space is {len(state.data)} bytes, not {CONFIG_SIZE}")
        for offset, (saved, mine, mask) in enumerate(zip(state.data, self._data, self._mask, strict=True)):
            if saved & ~mask != mine & ~mask:
                raise ValueError(
                    f"saved PCI configuration space differs from this function's at read-only offset"
                    f" {offset:#x}"
                )
        self._data[:] = state.data

    # --- queries ----------------------------------------------------------------------
    def raw(self, offset: int, size: int) -> bytes:
        return bytes(self._data[offset : offset + size])

    def set_raw(self, offset: int, data: bytes) -> None:
        """Device-side update of read-only bits (e.g. a capability's status)."""
        self._data[offset : offset + len(data)] = data

    @property
    def command(self) -> int:
        return int(struct.unpack_from("<H", self._data, COMMAND)[0])

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        if bar is None:
            return 0
        low = struct.unpack_from("<I", self._data, BAR0 + 4 * index)[0]
        if bar.kind is BarKind.IO:
            return int(low & 0xFFFF_FFFC)
        address = low & 0xFFFF_FFF0
        if bar.kind is BarKind.MEM64:
            address |= struct.unpack_from("<I", self._data, BAR0 + 4 * index + 4)[0] << 32
        return int(address)

    def bar_enabled(self, index: int) -> bool:
        """Whether the BAR decodes: its space is enabled and it is not mid-sizing."""
        bar = self.bars[index]
        if bar is None:
            return False
        enabled = self.command & (COMMAND_IO if bar.is_io else COMMAND_MEMORY)
        offset = BAR0 + 4 * index
        low = struct.unpack_from("<I", self._data, offset)[0]
        low_mask = struct.unpack_from("<I", self._mask, offset)[0]
        sizing = low & low_mask == low_mask  # all address bits set: the guest is sizing it
        return bool(enabled) and self.bar_address(index) != 0 and not sizing


__all__ = ["Bar", "BarKind", "PciConfigSpace", "PciConfigState"]
