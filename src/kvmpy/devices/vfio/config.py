"""An assigned function's configuration space: kvmpy's emulation laid over the real one.

Per byte, either kvmpy answers (from :class:`PciConfigSpace`'s data and write masks) or the
device does (pread/pwrite on its VFIO config region). kvmpy answers for the header (the
identity the device reported, the BARs it relocates into its own MMIO window, the ROM
BAR it hides, the interrupt line), for every capability's ID and next pointer, for the
whole MSI-X capability (the table is kvmpy's, see :mod:`.function`), for the whole MSI
capability (offered with one message and no per-vector masking, so one irqfd serves it)
and for the extended space (empty). The device answers for the status register and the other
capabilities' bodies (power management, PCI Express), which vfio-pci itself already filters.
The command register is both: kvmpy keeps the guest's value, and the device gets it,
so memory decoding and bus mastering (DMA) follow the guest.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from kvmpy.devices.pci.config_space import (
    BAR0,
    CAPABILITIES_POINTER,
    COMMAND,
    CONFIG_SIZE,
    NUM_BARS,
    STATUS,
    STATUS_CAPABILITIES,
    Bar,
    BarKind,
    PciConfigSpace,
)
from kvmpy.devices.pci.msix import CAP_ID_MSIX, MAX_VECTORS

LEGACY_SIZE = 0x100
HEADER_SIZE = 0x40
ROM_BAR = 0x30
CAP_ID_MSI = 0x05
MSI_ENABLE = 0x0001
MSI_64BIT = 0x0080
#: The MSI capability's bytes: ID, next, control, address (low, high if 64-bit), data, and the
#: mask and pending words a maskable one adds; kvmpy answers for all of them.
MSI_CAP_BYTES = 24
MAX_CAPABILITIES = 48  # (256 - 64) / 4: a longer chain is a loop


def capability_chain(real: bytes) -> list[tuple[int, int]]:
    """(offset, ID) of each capability in the device's legacy space, loops and strays cut."""
    if not struct.unpack_from("<H", real, STATUS)[0] & STATUS_CAPABILITIES:
        return []
    chain: list[tuple[int, int]] = []
    seen: set[int] = set()
    offset = real[CAPABILITIES_POINTER] & 0xFC
    while HEADER_SIZE <= offset < LEGACY_SIZE and offset not in seen and len(chain) < MAX_CAPABILITIES:
        seen.add(offset)
        chain.append((offset, real[offset]))
        offset = real[offset + 1] & 0xFC
    return chain


def bar_layout(real: bytes, sizes: list[int]) -> list[Bar | None]:
    """The BARs the device has: sizes from VFIO's regions, kinds from the BAR registers."""
    bars: list[Bar | None] = [None] * NUM_BARS
    index = 0
    while index < NUM_BARS:
        low = struct.unpack_from("<I", real, BAR0 + 4 * index)[0]
        size = sizes[index]
        if low & 1:
            kind = BarKind.IO
        elif low & 0x6 == 0x4 and index + 1 < NUM_BARS:
            kind = BarKind.MEM64
        else:
            kind = BarKind.MEM32
        if size:
            bars[index] = Bar(index, size, kind, prefetchable=kind is not BarKind.IO and bool(low & 0x8))
        index += 2 if kind is BarKind.MEM64 else 1
    return bars


class AssignedConfigSpace(PciConfigSpace):
    """See the module docstring. ``device_read(offset, size)`` and ``device_write(offset, data)``
    reach the real config space."""

    def __init__(
        self,
        real: bytes,
        bars: list[Bar | None],
        addresses: dict[int, int],
        device_read: Callable[[int, int], bytes],
        device_write: Callable[[int, bytes], None],
    ) -> None:
        vendor, device = struct.unpack_from("<HH", real, 0)
        super().__init__(
            vendor_id=vendor,
            device_id=device,
            class_code=int.from_bytes(real[9:12], "little"),
            revision=real[8],
            subsystem_vendor_id=struct.unpack_from("<H", real, 0x2C)[0],
            subsystem_id=struct.unpack_from("<H", real, 0x2E)[0],
            interrupt_pin=real[0x3D],
        )
        self._device_read = device_read
        self._device_write = device_write
        self._emulated = bytearray(b"\1" * HEADER_SIZE) + bytearray(CONFIG_SIZE - HEADER_SIZE)
        self._emulated[STATUS : STATUS + 2] = b"\0\0"
        self._emulated[LEGACY_SIZE:] = b"\1" * (CONFIG_SIZE - LEGACY_SIZE)  # no extended capabilities
        self.set_raw(0x0C, real[0x0C:0x0E])  # cache line size, latency timer (read-only here)
        self.set_raw(0x0E, bytes([real[0x0E] & 0x7F]))  # header type 0, one function
        for bar in bars:
            if bar is not None:
                self.add_bar(bar, addresses[bar.index])
        self.msix_offset: int | None = None
        self.msix_vectors = 0
        self.msi_offset: int | None = None
        self._chain(real)

    def _chain(self, real: bytes) -> None:
        """Rebuild the capability list (loops and strays cut); MSI-X and MSI are emulated whole."""
        kept = capability_chain(real)
        self.set_raw(CAPABILITIES_POINTER, bytes([kept[0][0] if kept else 0]))  # 0: none
        for number, (offset, cap) in enumerate(kept):
            following = kept[number + 1][0] if number + 1 < len(kept) else 0
            self.set_raw(offset, bytes([cap, following]))
            self._emulated[offset : offset + 2] = b"\1\1"
            if cap == CAP_ID_MSIX:
                self._emulate_msix(offset, real)
            elif cap == CAP_ID_MSI:
                self._emulate_msi(offset, real)

    def _emulate_msix(self, offset: int, real: bytes) -> None:
        control, table, pba = struct.unpack_from("<HII", real, offset + 2)
        self.msix_vectors = min((control & 0x7FF) + 1, MAX_VECTORS)
        self.msix_offset = offset
        self.set_raw(offset + 2, struct.pack("<HII", self.msix_vectors - 1, table, pba))
        self._emulated[offset : offset + 12] = b"\1" * 12

    def _emulate_msi(self, offset: int, real: bytes) -> None:
        """MSI as one message (MMC 0) without per-vector masking; 64-bit if the device is."""
        control = struct.unpack_from("<H", real, offset + 2)[0] & MSI_64BIT
        self.msi_offset = offset
        self.set_raw(offset + 2, struct.pack("<H", control) + bytes(12))
        self._set_mask(offset + 2, 2, MSI_ENABLE)
        self._set_mask(offset + 4, 4, 0xFFFF_FFFC)
        data = offset + 8
        if control & MSI_64BIT:
            self._set_mask(offset + 8, 4, 0xFFFF_FFFF)
            data = offset + 12
        self._set_mask(data, 2, 0xFFFF)
        end = min(offset + MSI_CAP_BYTES, LEGACY_SIZE)
        self._emulated[offset:end] = b"\1" * (end - offset)

    def msi_message(self) -> tuple[bool, int, int]:
        """(enabled, address, data) of the MSI capability the guest programmed."""
        assert self.msi_offset is not None
        at = self.msi_offset
        control, low = struct.unpack_from("<HI", self.raw(at + 2, 6))
        high, data = (struct.unpack_from("<IH", self.raw(at + 8, 6)) if control & MSI_64BIT
                      else (0, struct.unpack_from("<H", self.raw(at + 8, 2))[0]))  # fmt: skip
        return bool(control & MSI_ENABLE), high << 32 | low, data

    def msix_location(self) -> tuple[int, int, int, int]:
        """(table BAR, table offset, PBA BAR, PBA offset) as the device places them."""
        assert self.msix_offset is not None
        table, pba = struct.unpack_from("<II", self.raw(self.msix_offset + 4, 8))
        return table & 7, table & ~7, pba & 7, pba & ~7

    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None) -> int:
        """MsixTable declares its capability here: it is the device's, already in place, so
        only the writable bits of its control word are taken."""
        if cap_id != CAP_ID_MSIX or self.msix_offset is None:
            raise ValueError(f"an assigned function has no room for capability {cap_id:#x}")
        if writable is not None:
            self._set_mask(self.msix_offset + 2, 2, int.from_bytes(writable[:2], "little"))
        return self.msix_offset

    # --- guest access -----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SIZE:
            return super().read(offset, size)
        emulated = self.raw(offset, size)
        if all(self._emulated[offset : offset + size]):
            return int.from_bytes(emulated, "little")
        real = self._device_read(offset, size)
        mixed = bytes(e if self._emulated[offset + i] else real[i] for i, e in enumerate(emulated))
        return int.from_bytes(mixed, "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4) or offset < 0 or offset + size > CONFIG_SIZE:
            return
        data = value.to_bytes(size, "little")
        start = None
        for i in range(size + 1):  # forward each run of the device's bytes
            forwarded = i < size and not self._emulated[offset + i]
            if forwarded and start is None:
                start = i
            elif not forwarded and start is not None:
                self._device_write(offset + start, data[start:i])
                start = None
        super().write(offset, size, value)
        if offset < COMMAND + 2 and offset + size > COMMAND:
            self._device_write(COMMAND, self.raw(COMMAND, 2))


__all__ = ["AssignedConfigSpace", "bar_layout", "capability_chain"]
