"""An assigned PCI function as the guest sees it: VFIO device underneath, kvmpy's config space on top.

- BARs: kvmpy places them (addresses from the caller, who takes them from the layout);
  the parts VFIO lets kvmpy mmap become KVM memory slots through the ``map_memory``
  callback, so guest MMIO to them never exits; the rest (the MSI-X table and PBA
  pages, regions that cannot be mapped, I/O BARs) exits and is forwarded here: the
  MSI-X structures to kvmpy's :class:`MsixTable`, everything else to the device with
  pread/pwrite.
- Interrupts: each MSI-X vector the guest leaves unmasked is bound with
  VFIO_DEVICE_SET_IRQS to the eventfd of the vector's KVM irqfd (the ``sender``), so
  the device's interrupt goes from the host's handler into the guest without kvmpy;
  a masked vector is bound to an eventfd kvmpy watches (``watch``), which only sets the
  pending bit. MSI (one message) is bound the same way to one irqfd, routed to the address
  and data the guest wrote. With neither on, INTx goes through an irqfd with a resample fd
  (``bind_intx``) that VFIO unmasks on.

Nothing here imports KVM: slots, irqfds and the event loop are callbacks.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import threading
from collections.abc import Callable
from typing import Protocol

from kvmpy.abi import vfio as abi
from kvmpy.bus import BusDevice
from kvmpy.devices.pci.config_space import Bar, PciConfigSpace
from kvmpy.devices.pci.msix import ENTRY_SIZE, PBA_OFFSET, MsiSender, MsixTable
from kvmpy.devices.vfio.config import LEGACY_SIZE, MSI_CAP_BYTES, AssignedConfigSpace, bar_layout
from kvmpy.eventfd import EventFd
from kvmpy.vfio.device import VfioDevice

log = logging.getLogger("kvmpy.vfio")
PAGE = mmap.PAGESIZE

#: map_memory(gpa, size, host address) -> a handle unmap_memory takes back.
MapMemory = Callable[[int, int, int], object]
UnmapMemory = Callable[[object], None]
#: watch(fd, handler) / unwatch(fd): the event loop, for masked vectors.
Watch = Callable[[int, Callable[[], None]], None]
Unwatch = Callable[[int], None]
#: bind_intx(trigger fd, resample fd) -> unbind: an irqfd on the function's INTx GSI.
BindIntx = Callable[[int, int], Callable[[], None]]


class IrqfdSender(MsiSender, Protocol):
    """An MsiSender whose vectors are KVM irqfds (kvmpy.vmm.msi.IrqfdMsiSender)."""

    def irqfd(self, vector: int) -> int | None: ...


class AssignedFunction:
    """One VFIO device on kvmpy's PCI bus (a :class:`kvmpy.devices.pci.root.PciFunction`)."""

    def __init__(
        self,
        device: VfioDevice,
        bar_addresses: Callable[[list[Bar | None]], dict[int, int]],
        sender: Callable[[int], IrqfdSender],
        map_memory: MapMemory,
        unmap_memory: UnmapMemory,
        watch: Watch,
        unwatch: Unwatch,
        bind_intx: BindIntx | None = None,
    ) -> None:
        self.device = device
        self._map_memory, self._unmap_memory = map_memory, unmap_memory
        self._watch, self._unwatch = watch, unwatch
        self._lock = threading.RLock()  # taken before the MSI-X table's lock, never after
        config_index = abi.VFIO_PCI_CONFIG_REGION_INDEX
        real = device.read(config_index, 0, LEGACY_SIZE)
        sizes = [device.regions[i].size if i < len(device.regions) else 0 for i in range(6)]
        bars = bar_layout(real, sizes)
        self.space = AssignedConfigSpace(
            real,
            bars,
            bar_addresses(bars),
            lambda offset, size: device.read(config_index, offset, size),
            lambda offset, data: device.write(config_index, offset, data),
        )
        self.config: PciConfigSpace = self.space  # what the PCI root reads and writes
        self.msix: MsixTable | None = None
        self._msix_at = (-1, 0, -1, 0)
        self._masked_fds: list[EventFd] = []
        self._bound: list[int] | None = None  # the fds VFIO has per vector, None: MSI-X off
        self._intx_unbind: Callable[[], None] | None = None
        self._intx_fds: tuple[EventFd, EventFd] | None = None
        self._bind_intx = bind_intx
        msix_irqs = device.irqs[abi.VFIO_PCI_MSIX_IRQ_INDEX].count if len(device.irqs) > 2 else 0
        if self.space.msix_offset is not None and msix_irqs:
            vectors = min(self.space.msix_vectors, msix_irqs)
            self._irq_sender = sender(vectors)
            self.msix = MsixTable(self.space, vectors, self.space.msix_location()[0], self._irq_sender)
            self.msix.on_mask_change = self._rebind
            self._msix_at = self.space.msix_location()
            self._masked_fds = [EventFd() for _ in range(vectors)]
            for vector, eventfd in enumerate(self._masked_fds):
                watch(eventfd.fd, _masked_handler(self, vector, eventfd))
        self._masks_before = self.msix.snapshot_masks() if self.msix else []
        msi_irqs = device.irqs[abi.VFIO_PCI_MSI_IRQ_INDEX].count if len(device.irqs) > 1 else 0
        #: One irqfd for MSI, if the function has it; whether VFIO has it bound now.
        self._msi_sender = sender(1) if self.space.msi_offset is not None and msi_irqs else None
        self._msi_bound = False
        self._maps: dict[int, list[tuple[mmap.mmap, int, int]]] = {}  # BAR -> (mapping, offset, size)
        for index, bar in enumerate(self.config.bars):
            if bar is not None:  # mapped now, at set-up: Python's mmap fstats its file, which a
                self._mappings(index)  # vCPU thread's seccomp filter refuses (seen in the lab)
        self._slots: dict[int, list[object]] = {}
        self._enable_intx()

    # --- PciFunction --------------------------------------------------------------------------
    def bar_device(self, index: int) -> BusDevice | None:
        return _BarAccess(self, index) if self.config.bars[index] is not None else None

    def bar_mapped(self, index: int, address: int | None) -> None:
        """The guest moved BAR ``index`` (None: stopped decoding it): move its memory slots."""
        with self._lock:
            for handle in self._slots.pop(index, []):
                self._unmap_memory(handle)
            bar = self.config.bars[index]
            if address is None or bar is None or bar.is_io or address % PAGE:
                return
            self._slots[index] = [
                self._map_memory(address + offset, size, _host_address(mapping))
                for mapping, offset, size in self._mappings(index)
            ]

    def config_written(self, offset: int, size: int) -> None:
        msi = self.space.msi_offset
        touches_msi = msi is not None and offset < msi + MSI_CAP_BYTES and offset + size > msi
        if self._msi_sender is not None and touches_msi:
            with self._lock:
                self._msi_written()
        if self.msix is None:
            return
        with self._lock:
            before, self._masks_before = self._masks_before, self.msix.snapshot_masks()
            self.msix.config_written(before)
            self._rebind()  # the enable bit may have changed without any vector's mask

    # --- BARs ---------------------------------------------------------------------------------
    def _trapped(self, index: int) -> list[tuple[int, int]]:
        """Page-aligned ranges of BAR ``index`` that must exit: the MSI-X table and PBA."""
        if self.msix is None:
            return []
        table_bar, table, pba_bar, pba = self._msix_at
        ranges = []
        if table_bar == index:
            ranges.append(_pages(table, self.msix.vectors * ENTRY_SIZE))
        if pba_bar == index:
            ranges.append(_pages(pba, 8 * ((self.msix.vectors + 63) // 64)))
        return ranges

    def _mappings(self, index: int) -> list[tuple[mmap.mmap, int, int]]:
        """kvmpy's mmaps of the mappable, untrapped parts of BAR ``index`` (made once, at set-up)."""
        if index not in self._maps:
            region = self.device.regions[index]
            pieces = []
            if region.mappable:
                for start, length in region.mmap_areas:
                    for offset, size in _subtract(_aligned(start, length), self._trapped(index)):
                        pieces.append((self.device.map_region(index, offset, size), offset, size))
            self._maps[index] = pieces
        return self._maps[index]

    def bar_read(self, index: int, offset: int, data: memoryview) -> None:
        target = self._msix_target(index, offset, len(data))
        if target is not None and self.msix is not None:
            self.msix.read(target, data)
            return
        data[:] = self.device.read(index, offset, len(data))

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        target = self._msix_target(index, offset, len(data))
        if target is not None and self.msix is not None:
            with self._lock:
                self.msix.write(target, data)
            return
        self.device.write(index, offset, data)

    def _msix_target(self, index: int, offset: int, size: int) -> int | None:
        """The MsixTable offset an access to BAR ``index`` at ``offset`` reaches, if any."""
        if self.msix is None:
            return None
        table_bar, table, pba_bar, pba = self._msix_at
        if index == table_bar and table <= offset < table + self.msix.vectors * ENTRY_SIZE:
            return offset - table
        if index == pba_bar and pba <= offset < pba + 8 * ((self.msix.vectors + 63) // 64):
            return PBA_OFFSET + offset - pba
        return None

    # --- interrupts ---------------------------------------------------------------------------
    def _rebind(self) -> None:
        """Give VFIO, per vector, the irqfd (deliverable) or the watched pending fd (masked)."""
        with self._lock:
            msix = self.msix
            assert msix is not None
            if not msix.enabled:
                if self._bound is not None:
                    self.device.disable_irqs(abi.VFIO_PCI_MSIX_IRQ_INDEX)
                    self._bound = None
                    self._enable_intx()
                return
            wanted = []
            for vector in range(msix.vectors):
                fd = msix.irqfd(vector)
                wanted.append(fd if fd is not None else self._masked_fds[vector].fd)
            if self._bound is None:
                self._disable_intx()  # the kernel has one interrupt type on at a time
                self.device.set_irq_eventfds(abi.VFIO_PCI_MSIX_IRQ_INDEX, 0, wanted)
            else:  # only the vectors that changed: the kernel re-requests each host IRQ it is given
                changed = [vector for vector, fd in enumerate(wanted) if fd != self._bound[vector]]
                if changed:
                    first, last = changed[0], changed[-1]
                    self.device.set_irq_eventfds(abi.VFIO_PCI_MSIX_IRQ_INDEX, first, wanted[first : last + 1])
            self._bound = wanted

    def _msi_written(self) -> None:
        """The guest wrote the MSI capability: route its message, bind or unbind the irqfd."""
        sender = self._msi_sender
        assert sender is not None
        enabled, address, data = self.space.msi_message()
        sender.changed(0, address, data)
        fd = sender.irqfd(0)
        if enabled and address and fd is not None and not self._msi_bound:
            self._disable_intx()  # the kernel has one interrupt type on at a time
            self.device.set_irq_eventfds(abi.VFIO_PCI_MSI_IRQ_INDEX, 0, [fd])
            self._msi_bound = True
        elif not enabled and self._msi_bound:
            self.device.disable_irqs(abi.VFIO_PCI_MSI_IRQ_INDEX)
            self._msi_bound = False
            self._enable_intx()

    def masked_interrupt(self, vector: int) -> None:
        """The device raised a masked vector: its pending bit is set (sent at unmask)."""
        with self._lock:
            if self.msix is not None:
                self.msix.signal(vector)

    def _enable_intx(self) -> None:
        if self._bind_intx is None or not self.config.read(0x3D, 1) or self._intx_unbind is not None:
            return
        if len(self.device.irqs) < 1 or not self.device.irqs[abi.VFIO_PCI_INTX_IRQ_INDEX].count:
            return
        trigger, resample = EventFd(), EventFd()
        self._intx_fds = (trigger, resample)
        self._intx_unbind = self._bind_intx(trigger.fd, resample.fd)
        self.device.set_irq_eventfds(abi.VFIO_PCI_INTX_IRQ_INDEX, 0, [trigger.fd])
        self.device.set_intx_unmask_fd(resample.fd)

    def _disable_intx(self) -> None:
        if self._intx_unbind is None or self._intx_fds is None:
            return
        self.device.disable_irqs(abi.VFIO_PCI_INTX_IRQ_INDEX)
        self._intx_unbind()
        for eventfd in self._intx_fds:
            eventfd.close()
        self._intx_unbind, self._intx_fds = None, None

    # --- the end ------------------------------------------------------------------------------
    def close(self) -> None:
        """Interrupts off, memory slots gone, mappings dropped (the caller releases the device)."""
        with self._lock:
            if self._bound is not None and self.device.fd >= 0:
                self.device.disable_irqs(abi.VFIO_PCI_MSIX_IRQ_INDEX)
                self._bound = None
            if self._msi_bound and self.device.fd >= 0:
                self.device.disable_irqs(abi.VFIO_PCI_MSI_IRQ_INDEX)
                self._msi_bound = False
            if self.device.fd >= 0:
                self._disable_intx()
            for index in list(self._slots):
                for handle in self._slots.pop(index):
                    self._unmap_memory(handle)
            for pieces in self._maps.values():
                for mapping, _, _ in pieces:
                    mapping.close()
            self._maps.clear()
            for eventfd in self._masked_fds:
                self._unwatch(eventfd.fd)
                eventfd.close()
            self._masked_fds = []


class _BarAccess:
    """The bus device of one BAR: the accesses that exit."""

    def __init__(self, function: AssignedFunction, index: int) -> None:
        self._function = function
        self._index = index

    def read(self, offset: int, data: memoryview) -> None:
        self._function.bar_read(self._index, offset, data)

    def write(self, offset: int, data: bytes) -> None:
        self._function.bar_write(self._index, offset, data)


def _masked_handler(function: AssignedFunction, vector: int, eventfd: EventFd) -> Callable[[], None]:
    def fired() -> None:
        eventfd.drain()
        function.masked_interrupt(vector)

    return fired


def _host_address(mapping: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mapping))


def _pages(offset: int, size: int) -> tuple[int, int]:
    start = offset & ~(PAGE - 1)
    return start, ((offset + size + PAGE - 1) & ~(PAGE - 1)) - start


def _aligned(offset: int, size: int) -> tuple[int, int]:
    """The whole pages inside [offset, offset + size) (KVM slots are page-granular)."""
    start = (offset + PAGE - 1) & ~(PAGE - 1)
    end = (offset + size) & ~(PAGE - 1)
    return start, max(end - start, 0)


def _subtract(area: tuple[int, int], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``area`` minus ``holes`` (all (offset, size)), as a list of non-empty pieces."""
    pieces = [area] if area[1] else []
    for hole_start, hole_size in holes:
        hole_end = hole_start + hole_size
        cut = []
        for start, size in pieces:
            end = start + size
            if start < hole_start:
                cut.append((start, min(end, hole_start) - start))
            if end > hole_end:
                cut.append((max(start, hole_end), end - max(start, hole_end)))
        pieces = [(start, size) for start, size in cut if size > 0]
    return pieces


__all__ = ["AssignedFunction"]
