"""The modern virtio-pci transport (virtio 1.x, 4.1): one PCI function per virtio device.

BAR 0 (memory) holds the common configuration, ISR, device configuration and
notification areas, each found by the driver through a vendor-specific PCI
capability; BAR 1 holds the MSI-X table and PBA. Queue notifications are
meant to reach the device through ioeventfds the VMM registers at the
notify addresses (``notify_areas``), so the vCPU thread never sees them;
writes that do exit are handled the same way. Interrupts are MSI-X
vectors, one per queue, delivered through the VMM's MsiSender; a driver
that leaves MSI-X off gets legacy INTx instead: a level-triggered line
raised with the ISR bits and lowered when the driver reads the ISR.

Everything the driver writes is checked: an invalid queue setup or a
broken ring marks the device DEVICE_NEEDS_RESET, logs once and leaves the
VM running.

Locking: the transport and its device model share the device's one lock
(:class:`kvmpy.virtio.guard.DeviceGuard`, whose docstring holds the lock order).
Every BAR 0 access, every queue notification (ioeventfd on the event loop or a
notify write that exited on a vCPU thread), activation and reset run under it,
so a reset waits for the request in flight and no queue is walked twice at once.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from kvmpy.bus import BusDevice
from kvmpy.devices.pci.config_space import (
    COMMAND_INTX_DISABLE,
    INTERRUPT_LINE,
    Bar,
    BarKind,
    PciConfigSpace,
    PciConfigState,
)
from kvmpy.devices.pci.msix import BAR_SIZE as MSIX_BAR_SIZE
from kvmpy.devices.pci.msix import NO_VECTOR, MsiSender, MsixState, MsixTable
from kvmpy.errors import GuestError, RestoreError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.ratelimit import guest_log
from kvmpy.virtio.device import F_EVENT_IDX, F_VERSION_1, VirtioDevice
from kvmpy.virtio.queue import QueueState, SplitQueue

log = logging.getLogger("kvmpy.virtio")

VENDOR_VIRTIO = 0x1AF4
DEVICE_ID_BASE = 0x1040
CAP_VENDOR = 0x09
CFG_COMMON, CFG_NOTIFY, CFG_ISR, CFG_DEVICE = 1, 2, 3, 4

# BAR 0 layout.
COMMON_OFFSET, COMMON_SIZE = 0x0000, 0x40
ISR_OFFSET, ISR_SIZE = 0x1000, 0x4
DEVICE_OFFSET, DEVICE_SIZE = 0x2000, 0x1000
NOTIFY_OFFSET, NOTIFY_MULTIPLIER = 0x3000, 4
BAR0_SIZE = 0x4000

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 64
STATUS_FAILED = 128

CLASS_BY_TYPE = {1: 0x020000, 2: 0x010000, 3: 0x078000, 4: 0x00FF00}

#: Registers the notify addresses with the VMM (ioeventfd): (address, length, queue) -> None.
NotifyWiring = Callable[[list[tuple[int, int, int]]], None]
#: Drives the function's INTx line (True: asserted); the VMM routes it to an IOAPIC pin.
IntxLine = Callable[[bool], None]


@dataclass(frozen=True, slots=True)
class TransportState:
    """Everything the driver set up through PCI and the common configuration."""

    config: PciConfigState
    msix: MsixState
    status: int
    #: What the device offered when saved: the restored device must offer the same.
    device_features: int
    driver_features: int
    device_feature_select: int
    driver_feature_select: int
    queue_select: int
    config_vector: int
    queue_vectors: tuple[int, ...]
    isr: int
    config_generation: int
    queues: tuple[QueueState, ...]


class VirtioPciTransport:
    """A virtio device as a PCI function."""

    def __init__(
        self,
        device: VirtioDevice,
        mem: GuestMemory,
        msi: MsiSender,
        bar0_address: int,
        bar1_address: int,
        wire_notify: NotifyWiring,
        intx: IntxLine | None = None,
        interrupt_line: int = 0xFF,
    ) -> None:
        self.device = device
        self._mem = mem
        self._wire_notify = wire_notify
        self._intx = intx
        self._intx_level = False
        #: The device's one lock (see kvmpy.virtio.guard), shared with the device model.
        self._lock = device.guard.lock
        device.guard.bind(self.fail)
        self.config = PciConfigSpace(
            vendor_id=VENDOR_VIRTIO,
            device_id=DEVICE_ID_BASE + device.device_type,
            class_code=CLASS_BY_TYPE.get(device.device_type, 0xFF0000),
            revision=1,
            subsystem_vendor_id=VENDOR_VIRTIO,
            subsystem_id=0x40 + device.device_type,
            interrupt_pin=1 if intx is not None else 0,  # INTA#
        )
        self.config.write(INTERRUPT_LINE, 1, interrupt_line)
        self.config.add_bar(Bar(0, BAR0_SIZE, BarKind.MEM32), bar0_address)
        self.config.add_bar(Bar(1, MSIX_BAR_SIZE, BarKind.MEM32), bar1_address)
        for cfg_type, offset, length in (
            (CFG_COMMON, COMMON_OFFSET, COMMON_SIZE),
            (CFG_ISR, ISR_OFFSET, ISR_SIZE),
            (CFG_DEVICE, DEVICE_OFFSET, DEVICE_SIZE),
        ):
            self.config.add_capability(
                CAP_VENDOR, struct.pack("<BBBBHII", 16, cfg_type, 0, 0, 0, offset, length)
            )
        notify_length = NOTIFY_MULTIPLIER * len(device.queue_sizes)
        self.config.add_capability(
            CAP_VENDOR,
            struct.pack(
                "<BBBBHIII", 20, CFG_NOTIFY, 0, 0, 0, NOTIFY_OFFSET, notify_length, NOTIFY_MULTIPLIER
            ),
        )
        self.msix = MsixTable(self.config, len(device.queue_sizes) + 1, bar=1, sender=msi)
        self.queues = [SplitQueue(size) for size in device.queue_sizes]
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        self._bar0 = _Bar0(self)
        self._bar0_address: int | None = None
        self._reset_state()
        self.guest_errors = 0
        bind_irqfds = getattr(device, "bind_irqfds", None)
        if bind_irqfds is not None:  # a data plane outside Python signals the guest itself
            bind_irqfds(self.irqfd)
            self.msix.on_mask_change = getattr(device, "interrupts_changed", None)
        #: Each vector's deliverability at the last configuration write (to report changes).
        self._masks_before = self.msix.snapshot_masks()

    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.config_vector = NO_VECTOR
        self.queue_select = 0
        self.config_generation = 0
        self.isr = 0
        for queue in self.queues:
            queue.reset()
        self.queue_vectors = [NO_VECTOR] * len(self.queues)
        self._update_intx()

    # --- PciFunction ---------------------------------------------------------------------
    def bar_device(self, index: int) -> BusDevice | None:
        if index == 0:
            return self._bar0
        return self.msix if index == 1 else None

    def config_written(self, offset: int, size: int) -> None:
        before, self._masks_before = self._masks_before, self.msix.snapshot_masks()
        self.msix.config_written(before)
        with self._lock:
            self._update_intx()  # MSI-X enable and INTx disable both live in config space

    def bar_mapped(self, index: int, address: int | None) -> None:
        if index != 0:
            return
        with self._lock:
            self._bar0_address = address
            areas = self.notify_areas()
        self._wire_notify(areas)  # outside the lock: wiring waits on the event loop's lock

    def notify_areas(self) -> list[tuple[int, int, int]]:
        """(address, length, queue) of every notify register while BAR 0 is mapped."""
        address = self._bar0_address
        if address is None:
            return []
        base = address + NOTIFY_OFFSET
        return [(base + NOTIFY_MULTIPLIER * i, 2, i) for i in range(len(self.queues))]

    # --- notifications and interrupts ---------------------------------------------------
    def notify(self, index: int) -> None:
        """Queue ``index`` was kicked (from an ioeventfd or an exit), under the device's lock."""
        with self._lock:
            if not 0 <= index < len(self.queues) or not self.status & STATUS_DRIVER_OK:
                return
            if self.status & STATUS_NEEDS_RESET:
                return  # a broken device stays quiet until the driver resets it
            try:
                self.device.queue_notify(index)
            except GuestError as error:
                self.fail(str(error))

    def interrupt(self, index: int) -> None:
        """Tell the driver queue ``index`` has used buffers."""
        with self._lock:
            self.isr |= 1
            vector = self.queue_vectors[index] if 0 <= index < len(self.queue_vectors) else NO_VECTOR
            self._update_intx()
        self.msix.signal(vector)

    def irqfd(self, index: int) -> int | None:
        """The eventfd that raises queue ``index``'s MSI-X vector in KVM, for a back end
        outside Python to signal directly; None while MSI-X is off or no vector is set."""
        if not 0 <= index < len(self.queue_vectors):
            return None
        return self.msix.irqfd(self.queue_vectors[index])

    def config_changed(self) -> None:
        """The device's configuration changed (a disk's new size): the driver rereads it."""
        with self._lock:
            self.config_generation = (self.config_generation + 1) & 0xFF
            self.isr |= 2
            self._update_intx()
        self.msix.signal(self.config_vector)

    def fail(self, why: str) -> None:
        """The driver broke the rules: flag DEVICE_NEEDS_RESET and tell it through the config vector."""
        with self._lock:
            self.guest_errors += 1
            kind, message = self.device.device_type, "virtio device type %d needs reset: %s"
            guest_log.warning(log, ("virtio-needs-reset", id(self)), message, kind, why)
            self.status |= STATUS_NEEDS_RESET
            self.isr |= 2
            self.config_generation = (self.config_generation + 1) & 0xFF
            self._update_intx()
        self.msix.signal(self.config_vector)

    def _update_intx(self) -> None:
        """Drive INTx from the ISR while MSI-X is off and INTx is not disabled (lock held)."""
        if self._intx is None:
            return
        enabled = not self.msix.enabled and not self.config.command & COMMAND_INTX_DISABLE
        level = enabled and bool(self.isr)
        if level != self._intx_level:
            self._intx_level = level
            self._intx(level)

    # --- common configuration ----------------------------------------------------------
    def _selected(self) -> SplitQueue | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    def read_common(self, offset: int, size: int) -> int:
        queue = self._selected()
        features = (
            self.device.features >> (32 * self.device_feature_select) if self.device_feature_select < 2 else 0
        )
        values: dict[int, tuple[int, int]] = {
            0: (4, self.device_feature_select),
            4: (4, features & 0xFFFF_FFFF),
            8: (4, self.driver_feature_select),
            12: (4, (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFF_FFFF
                 if self.driver_feature_select < 2 else 0),
            16: (2, self.config_vector),
            18: (2, len(self.queues)),
            20: (1, self.status),
            21: (1, self.config_generation),
            22: (2, self.queue_select),
            24: (2, queue.size if queue else 0),
            26: (2, self.queue_vectors[self.queue_select] if queue else NO_VECTOR),
            28: (2, int(queue.ready) if queue else 0),
            30: (2, self.queue_select if queue else 0),
            32: (8, queue.desc_addr if queue else 0),
            40: (8, queue.driver_addr if queue else 0),
            48: (8, queue.device_addr if queue else 0),
        }  # fmt: skip
        for start, (width, value) in values.items():
            if start <= offset and offset + size <= start + width:
                return (value >> (8 * (offset - start))) & ((1 << (8 * size)) - 1)
        return 0

    def write_common(self, offset: int, size: int, value: int) -> None:
        queue = self._selected()
        if offset == 0 and size == 4:
            self.device_feature_select = value
        elif offset == 8 and size == 4:
            self.driver_feature_select = value
        elif (
            offset == 12
            and size == 4
            and self.driver_feature_select < 2
            and not self.status & STATUS_FEATURES_OK
        ):
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFF_FFFF << shift)) | (value << shift)
        elif offset == 16 and size == 2:
            self.config_vector = self._vector(value)
        elif offset == 20 and size == 1:
            self._write_status(value)
        elif offset == 22 and size == 2:
            self.queue_select = value
        elif queue is not None and not queue.ready:
            self._write_queue(queue, offset, size, value)
        elif queue is not None and offset == 26 and size == 2:
            self.queue_vectors[self.queue_select] = self._vector(value)

    def _vector(self, value: int) -> int:
        """A vector the table has, or NO_VECTOR: the driver reads back that the mapping failed
        (virtio 1.x, 4.1.5.1.2), and saved state never holds a vector that is not there."""
        return value if value < self.msix.vectors else NO_VECTOR

    def _write_queue(self, queue: SplitQueue, offset: int, size: int, value: int) -> None:
        if offset == 24 and size == 2:
            queue.size = value
        elif offset == 26 and size == 2:
            self.queue_vectors[self.queue_select] = self._vector(value)
        elif offset == 28 and size == 2 and value == 1:
            queue.event_idx = bool(self.driver_features & F_EVENT_IDX)
            try:
                queue.check_layout(self._mem)
            except GuestError as error:
                self.fail(str(error))
                return
            queue.ready = True
        elif offset in (32, 36, 40, 44, 48, 52) and size == 4:
            self._set_address(queue, offset, value)
        elif offset in (32, 40, 48) and size == 8:
            self._set_address(queue, offset, value & 0xFFFF_FFFF)
            self._set_address(queue, offset + 4, value >> 32)

    @staticmethod
    def _set_address(queue: SplitQueue, offset: int, value: int) -> None:
        field = {32: "desc_addr", 40: "driver_addr", 48: "device_addr"}[offset & ~7]
        current = getattr(queue, field)
        if offset % 8:
            setattr(queue, field, (current & 0xFFFF_FFFF) | (value << 32))
        else:
            setattr(queue, field, (current & ~0xFFFF_FFFF) | value)

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.device.reset()
            self._reset_state()
            return
        newly = value & ~self.status
        if newly & STATUS_FEATURES_OK:
            offered = self.device.features
            if self.driver_features & ~offered or not self.driver_features & F_VERSION_1:
                value &= ~STATUS_FEATURES_OK  # refused: the driver must notice and give up
        self.status = (self.status & STATUS_NEEDS_RESET) | value
        if newly & STATUS_DRIVER_OK and self.status & STATUS_FEATURES_OK:
            try:  # activation may already use a ring (pending console input, say)
                self.device.activate(self._mem, self.queues, self.driver_features, self.interrupt)
            except GuestError as error:
                self.fail(str(error))

    # --- state ---------------------------------------------------------------------------
    def save(self) -> TransportState:
        """The transport's state, under the device's lock (no request is half done)."""
        with self._lock:
            return TransportState(
                self.config.save(), self.msix.save(), self.status, self.device.features,
                self.driver_features, self.device_feature_select, self.driver_feature_select,
                self.queue_select, self.config_vector, tuple(self.queue_vectors), self.isr,
                self.config_generation, tuple(queue.save() for queue in self.queues),
            )  # fmt: skip

    def restore(self, state: TransportState) -> None:
        """Load ``state``, validated as untrusted; raises RestoreError naming the field.

        Nothing runs yet: the BARs are placed by the PCI root, and :meth:`start_after_restore`
        re-drives INTx, reactivates the device and serves what the rings hold once the
        irqchip and vCPUs are restored too.
        """
        offered, acked = self.device.features, state.driver_features
        if state.device_features != offered:
            was = state.device_features
            raise RestoreError(f"saved virtio device offered features {was:#x}; this one offers {offered:#x}")
        if acked < 0 or acked & ~offered:
            raise RestoreError(
                f"saved virtio features acknowledged {acked:#x} were never offered ({offered:#x})"
            )
        if state.status & STATUS_FEATURES_OK and not acked & F_VERSION_1:
            raise RestoreError("saved virtio status has FEATURES_OK without VIRTIO_F_VERSION_1 acknowledged")
        vectors = (state.config_vector, *state.queue_vectors)
        if any(vector != NO_VECTOR and not 0 <= vector < self.msix.vectors for vector in vectors):
            raise RestoreError(f"saved virtio MSI-X vectors {vectors} are not among the {self.msix.vectors}")
        if len(state.queues) != len(self.queues) or len(state.queue_vectors) != len(self.queues):
            raise RestoreError(
                f"saved virtio state has {len(state.queues)} queues; this device has {len(self.queues)}"
            )
        ranges = (
            (state.status, 0xFF, "status"), (state.isr, 3, "ISR"),
            (state.config_generation, 0xFF, "config generation"),
            (state.queue_select, 0xFFFF, "queue select"),
            (state.device_feature_select, 0xFFFF_FFFF, "feature select"),
            (state.driver_feature_select, 0xFFFF_FFFF, "feature select"),
        )  # fmt: skip
        for value, limit, what in ranges:
            if not 0 <= value <= limit:
                raise RestoreError(f"saved virtio {what} {value} is out of range")
        with self._lock:
            try:
                self.config.restore(state.config)
                self.msix.restore(state.msix)
            except ValueError as error:
                raise RestoreError(str(error)) from None
            for queue, saved in zip(self.queues, state.queues, strict=True):
                queue.restore(saved, self._mem)
            self.status, self.driver_features = state.status, acked
            self.device_feature_select = state.device_feature_select
            self.driver_feature_select = state.driver_feature_select
            self.queue_select, self.config_vector = state.queue_select, state.config_vector
            self.queue_vectors = list(state.queue_vectors)
            self.isr, self.config_generation = state.isr, state.config_generation

    def start_after_restore(self) -> None:
        """Bring a restored device back to work, from its restored state alone.

        INTx is driven to the level the ISR gives, a live device is activated again (which
        sets virtio-net's offloads on the tap), unmasked pending MSI-X vectors are sent, and
        every ready queue is served once: kicks that waited in the old process's eventfds
        are gone, and serving an empty ring is harmless.
        """
        with self._lock:
            self._intx_level = False
            self._update_intx()
            live = self.status & STATUS_DRIVER_OK and self.status & STATUS_FEATURES_OK
            if live and not self.status & STATUS_NEEDS_RESET:
                try:
                    self.device.activate(self._mem, self.queues, self.driver_features, self.interrupt)
                except GuestError as error:
                    self.fail(str(error))
        self.msix.config_written()
        for index, queue in enumerate(self.queues):
            if queue.ready:
                self.notify(index)

    def read_isr(self) -> int:
        """Reading the ISR acknowledges it: the bits clear and INTx drops."""
        with self._lock:
            value, self.isr = self.isr, 0
            self._update_intx()
        return value


class _Bar0:
    """BAR 0 accesses dispatched to the common, ISR, device and notify areas."""

    def __init__(self, transport: VirtioPciTransport) -> None:
        self._t = transport

    def read(self, offset: int, data: memoryview) -> None:
        size, t = len(data), self._t
        with t._lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE and size in (1, 2, 4, 8):
                value = t.read_common(offset - COMMON_OFFSET, size)
                data[:] = value.to_bytes(size, "little")
            elif ISR_OFFSET <= offset < ISR_OFFSET + ISR_SIZE:
                data[:] = bytes([t.read_isr()]) + bytes(size - 1)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
                chunk = t.device.read_config(offset - DEVICE_OFFSET, size)
                data[:] = chunk.ljust(size, b"\0")[:size]
            else:
                data[:] = b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        size, t = len(data), self._t
        value = int.from_bytes(data, "little")
        if NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_MULTIPLIER * len(t.queues):
            t.notify((offset - NOTIFY_OFFSET) // NOTIFY_MULTIPLIER)  # takes the device lock
            return
        with t._lock:
            if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_SIZE and size in (1, 2, 4, 8):
                t.write_common(offset - COMMON_OFFSET, size, value)
            elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_SIZE:
                t.device.write_config(offset - DEVICE_OFFSET, data)


__all__ = ["TransportState", "VirtioPciTransport"]
