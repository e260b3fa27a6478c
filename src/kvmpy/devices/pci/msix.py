"""MSI-X: a per-vector table of (address, data, mask) in a BAR, and a pending-bit array.

The device asks for vector N; if MSI-X is enabled and neither the function
nor the vector is masked, the message goes to an injected
:class:`MsiSender` (the VMM routes it into KVM through irqfd); otherwise the
pending bit is set and the message is sent when the guest unmasks.

Messages are sent and entry changes reported with the table's lock held: an
interrupt raised on the event loop while a vCPU rewrites the entry (Linux
masks, rewrites and unmasks it to move an interrupt to another CPU) goes out
before the rewrite or after it, never with the old message after the new one
was routed.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kvmpy.devices.pci.config_space import PciConfigSpace

CAP_ID_MSIX = 0x11
ENTRY_SIZE = 16
CONTROL_ENABLE = 1 << 15
CONTROL_FUNCTION_MASK = 1 << 14
VECTOR_MASKED = 1
NO_VECTOR = 0xFFFF
#: Where the table and PBA sit in their BAR.
TABLE_OFFSET = 0x0
PBA_OFFSET = 0x800
BAR_SIZE = 0x1000
MAX_VECTORS = PBA_OFFSET // ENTRY_SIZE


class MsiSender(Protocol):
    """Delivers MSI messages: ``send(vector, address, data)``; ``changed`` when an entry moves."""

    def send(self, vector: int, address: int, data: int) -> None: ...

    def changed(self, vector: int, address: int, data: int) -> None: ...


@dataclass(frozen=True, slots=True)
class MsixState:
    """The vector table as the guest programmed it, and the pending bits (the control word
    and function mask live in configuration space, saved with it)."""

    table: bytes
    pending: tuple[bool, ...]


class MsixTable:
    """The table and PBA of one function (a BAR device), plus the capability in its config space."""

    def __init__(self, config: PciConfigSpace, vectors: int, bar: int, sender: MsiSender) -> None:
        if not 0 < vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X vector count {vectors} out of range")
        self.vectors = vectors
        self._config = config
        self._sender = sender
        self._lock = threading.Lock()
        self._table = bytearray(ENTRY_SIZE * vectors)
        for vector in range(vectors):
            self._table[vector * ENTRY_SIZE + 12] = VECTOR_MASKED
        self._pending = [False] * vectors
        #: Called (without the table's lock) when vectors start or stop being deliverable: a
        #: back end outside Python that signals a vector's irqfd must stop while it is masked.
        self.on_mask_change: Callable[[], None] | None = None
        body = struct.pack("<HII", vectors - 1, TABLE_OFFSET | bar, PBA_OFFSET | bar)
        writable = struct.pack("<HII", CONTROL_ENABLE | CONTROL_FUNCTION_MASK, 0, 0)
        self.cap_offset = config.add_capability(CAP_ID_MSIX, body, writable)

    def _control(self) -> int:
        return int(struct.unpack("<H", self._config.raw(self.cap_offset + 2, 2))[0])

    @property
    def enabled(self) -> bool:
        return bool(self._control() & CONTROL_ENABLE)

    def _entry(self, vector: int) -> tuple[int, int, bool]:
        address, data, control = struct.unpack_from("<QII", self._table, vector * ENTRY_SIZE)
        return address, data, bool(control & VECTOR_MASKED)

    def _blocked(self, vector: int) -> bool:
        return bool(self._control() & CONTROL_FUNCTION_MASK) or self._entry(vector)[2]

    def deliverable(self, vector: int) -> bool:
        """MSI-X is on and neither the function nor ``vector`` is masked."""
        return 0 <= vector < self.vectors and self.enabled and not self._blocked(vector)

    def _deliverable_all(self) -> list[bool]:
        enabled = self.enabled
        return [enabled and not self._blocked(vector) for vector in range(self.vectors)]

    def _report_masks(self, before: list[bool]) -> None:
        """Tell the listener if any vector's deliverability changed (table lock not held)."""
        if self.on_mask_change is not None and self._deliverable_all() != before:
            self.on_mask_change()

    def signal(self, vector: int) -> bool:
        """Raise ``vector``; returns False if MSI-X is off or the vector invalid."""
        if vector == NO_VECTOR or not 0 <= vector < self.vectors or not self.enabled:
            return False
        with self._lock:  # held while sending: see the module docstring
            if self._blocked(vector):
                self._pending[vector] = True
                return True
            address, data, _ = self._entry(vector)
            self._sender.send(vector, address, data)
        return True

    def irqfd(self, vector: int) -> int | None:
        """The eventfd the sender raises ``vector`` with, if it has one (irqfd delivery) and the
        vector is deliverable now: a back end given it signals the guest without the table
        being consulted, so it gets it only while nothing masks the vector (``on_mask_change``
        says when that changes)."""
        lookup = getattr(self._sender, "irqfd", None)
        if lookup is None or not self.deliverable(vector):
            return None
        fd: int | None = lookup(vector)
        return fd

    def config_written(self, before: list[bool] | None = None) -> None:
        """The capability's control word may have changed: deliver what unmasking released.

        ``before``: each vector's deliverability before the write (see :meth:`snapshot_masks`),
        so a change can be reported."""
        with self._lock:
            self._deliver_pending()
        if before is not None:
            self._report_masks(before)

    def snapshot_masks(self) -> list[bool]:
        """Each vector's deliverability now (to compare after a configuration write)."""
        with self._lock:
            return self._deliverable_all()

    def _deliver_pending(self) -> None:
        """Send what is pending and no longer masked (lock held)."""
        for vector in range(self.vectors):
            if self._pending[vector] and self.enabled and not self._blocked(vector):
                self._pending[vector] = False
                address, data, _ = self._entry(vector)
                self._sender.send(vector, address, data)

    # --- state ------------------------------------------------------------------------
    def save(self) -> MsixState:
        with self._lock:
            return MsixState(bytes(self._table), tuple(self._pending))

    def restore(self, state: MsixState) -> None:
        """Load the table and pending bits, and route every programmed vector again.

        The routes are rebuilt from the restored entries (the sender's ``changed``), never
        from what this process did before; nothing is delivered here: what is pending goes
        out when the guest next unmasks, or at :meth:`config_written`.
        """
        if len(state.table) != ENTRY_SIZE * self.vectors or len(state.pending) != self.vectors:
            raise ValueError(
                f"saved MSI-X state has {len(state.table)} table bytes and {len(state.pending)} pending"
                f" bits; this function has {self.vectors} vectors"
            )
        with self._lock:
            self._table[:] = state.table
            self._pending = list(state.pending)
            for vector in range(self.vectors):
                address, data, _ = self._entry(vector)
                if address:
                    self._sender.changed(vector, address, data)

    # --- the BAR ----------------------------------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        size = len(data)
        if size not in (4, 8) or offset % 4:
            data[:] = b"\xff" * size
            return
        with self._lock:
            if offset + size <= len(self._table):
                data[:] = self._table[offset : offset + size]
            elif PBA_OFFSET <= offset < PBA_OFFSET + 8 * ((self.vectors + 63) // 64):
                bits = sum(1 << i for i, p in enumerate(self._pending) if p)
                qword = (offset - PBA_OFFSET) // 8
                value = (bits >> (64 * qword)) & ((1 << 64) - 1)
                shift = (offset - PBA_OFFSET) % 8
                data[:] = (value >> (8 * shift)).to_bytes(8, "little")[:size]
            else:
                data[:] = b"\0" * size

    def write(self, offset: int, data: bytes) -> None:
        size = len(data)
        if size not in (4, 8) or offset % 4 or offset + size > len(self._table):
            return  # the PBA is read-only; odd accesses are dropped
        with self._lock:
            before = self._deliverable_all()
            self._table[offset : offset + size] = data
            for vector in range(offset // ENTRY_SIZE, (offset + size - 1) // ENTRY_SIZE + 1):
                address, data_word, _ = self._entry(vector)
                self._sender.changed(vector, address, data_word)
            self._deliver_pending()
        self._report_masks(before)


__all__ = ["BAR_SIZE", "CAP_ID_MSIX", "NO_VECTOR", "MsiSender", "MsixState", "MsixTable"]
