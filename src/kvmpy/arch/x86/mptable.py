"""The Intel MultiProcessor Specification 1.4 table: CPUs and interrupt routing for
kernels that read it (CONFIG_X86_MPPARSE) instead of, or before, ACPI.

It says: N processors with APIC IDs 0..N-1 (0 boots), one ISA bus, one IOAPIC
with ID N, ISA IRQs routed to the IOAPIC pins of the same number (IRQ 0 to
pin 2, as the PIT is wired on a PC), ExtINT on LINT0 and NMI on LINT1.
"""

from __future__ import annotations

import struct

from kvmpy.arch.x86 import layout
from kvmpy.errors import ConfigError
from kvmpy.memory.guest_memory import GuestMemory

APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_ENABLED = 0x01
CPU_BOOTSTRAP = 0x02
ISA_BUS_ID = 0
INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3
ALL_LOCAL_APICS = 0xFF
#: Family 6 signature and FPU|APIC feature flags, enough for the MP parser.
CPU_SIGNATURE = 0x600
CPU_FEATURES = 0x201

_FLOATING_POINTER_SIZE = 16
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")


def _checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _entries(n_cpus: int) -> list[bytes]:
    ioapic_id = n_cpus
    entries = []
    for cpu in range(n_cpus):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0)
        entries.append(struct.pack("<BBBBII8x", 0, cpu, APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES))
    entries.append(struct.pack("<BB6s", 1, ISA_BUS_ID, b"ISA   "))
    entries.append(struct.pack("<BBBBI", 2, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_START))
    for irq in range(16):
        if irq == 2:
            continue  # the cascade: IOAPIC pin 2 carries the PIT's IRQ 0
        pin = 2 if irq == 0 else irq
        entries.append(struct.pack("<BBHBBBB", 3, INT_TYPE_INT, 0, ISA_BUS_ID, irq, ioapic_id, pin))
    entries.append(struct.pack("<BBHBBBB", 4, INT_TYPE_EXTINT, 0, ISA_BUS_ID, 0, ALL_LOCAL_APICS, 0))
    entries.append(struct.pack("<BBHBBBB", 4, INT_TYPE_NMI, 0, ISA_BUS_ID, 0, ALL_LOCAL_APICS, 1))
    return entries


def build_mptable(n_cpus: int, base: int = layout.MPTABLE_START) -> bytes:
    """Floating pointer at ``base`` followed by the configuration table."""
    entries = _entries(n_cpus)
    body = b"".join(entries)
    table_address = base + _FLOATING_POINTER_SIZE
    header = _HEADER.pack(
        b"PCMP",
        _HEADER.size + len(body),
        4,
        0,
        b"KVMPY   ",
        b"KVMPY MP    ",
        0,
        0,
        len(entries),
        layout.LAPIC_START,
        0,
        0,
        0,
    )
    table = bytearray(header + body)
    table[7] = _checksum(bytes(table))
    pointer = bytearray(struct.pack("<4sIBBB5x", b"_MP_", table_address, 1, 4, 0))
    pointer[10] = _checksum(bytes(pointer))
    return bytes(pointer + table)


def write_mptable(mem: GuestMemory, n_cpus: int) -> None:
    blob = build_mptable(n_cpus)
    if layout.MPTABLE_START + len(blob) > layout.MPTABLE_END:
        raise ConfigError(f"{n_cpus} vCPUs do not fit in the MP table area")
    mem.write(layout.MPTABLE_START, blob)


__all__ = ["build_mptable", "write_mptable"]
