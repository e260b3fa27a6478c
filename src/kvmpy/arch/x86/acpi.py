"""ACPI tables: how a modern kernel finds its CPUs, interrupt controllers and power button.

kvmpy writes an RSDP (v2) pointing at an XSDT that lists a FADT (with a FACS
and a DSDT) and a MADT. The MADT lists one local APIC per vCPU and the
IOAPIC, so kernels built without MP-table support (Debian's cloud flavour)
still find every vCPU. The FADT points at the ACPI PM device (PM1 event and
control blocks, PM timer, reset register); the DSDT's \\_S5 object gives the
SLP_TYP value that makes ``poweroff`` end the VM.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmpy.arch.x86 import aml, layout
from kvmpy.devices.legacy.acpi_pm import S5_SLP_TYP
from kvmpy.errors import ConfigError
from kvmpy.memory.guest_memory import GuestMemory

OEM_ID = b"KVMPY "
OEM_TABLE_ID = b"KVMPYVM "
CREATOR_ID = b"KVPY"
HEADER = struct.Struct("<4sIBB6s8sI4sI")

# FADT flags
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_PWR_BUTTON = 1 << 4  # 1: no fixed-feature power button
FADT_SLP_BUTTON = 1 << 5  # 1: no fixed-feature sleep button
FADT_RESET_REG_SUP = 1 << 10
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
ADDRESS_SPACE_IO = 1
# MADT
MADT_PCAT_COMPAT = 1
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INTERRUPT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MPS_ACTIVE_HIGH_LEVEL = 0x0D  # polarity active high (01), trigger level (11 << 2)


@dataclass(frozen=True, slots=True)
class AcpiTables:
    """Blobs to write at guest-physical addresses, and where the RSDP is."""

    blobs: tuple[tuple[int, bytes], ...]
    rsdp_address: int


def checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def _table(signature: bytes, revision: int, body: bytes) -> bytes:
    header = HEADER.pack(
        signature, HEADER.size + len(body), revision, 0, OEM_ID, OEM_TABLE_ID, 1, CREATOR_ID, 1
    )
    data = bytearray(header + body)
    data[9] = checksum(bytes(data))
    return bytes(data)


def _gas(address: int, bit_width: int, access_size: int) -> bytes:
    """Generic Address Structure in system I/O space."""
    return struct.pack("<BBBBQ", ADDRESS_SPACE_IO, bit_width, 0, access_size, address)


def build_dsdt() -> bytes:
    s5 = aml.name(
        "_S5_", aml.package(aml.integer(S5_SLP_TYP), aml.integer(S5_SLP_TYP), aml.integer(0), aml.integer(0))
    )
    com1 = aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(1)),
        aml.name(
            "_CRS", aml.resource_template(aml.io_port(layout.COM1_PORT, 8), aml.irq_no_flags(layout.COM1_IRQ))
        ),
    )
    rtc = aml.device(
        "RTC_",
        aml.name("_HID", aml.eisa_id("PNP0B00")),
        aml.name(
            "_CRS", aml.resource_template(aml.io_port(layout.RTC_PORT, 2), aml.irq_no_flags(layout.RTC_IRQ))
        ),
    )
    keyboard = aml.device(
        "KBD_",
        aml.name("_HID", aml.eisa_id("PNP0303")),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.io_port(layout.I8042_DATA_PORT, 1),
                aml.io_port(layout.I8042_COMMAND_PORT, 1),
                aml.irq_no_flags(1),
            ),
        ),
    )
    pvpanic = aml.device(
        "PEVT",
        aml.name("_HID", aml.string("QEMU0001")),
        aml.name("_CRS", aml.resource_template(aml.io_port(layout.PVPANIC_PORT, 1))),
    )
    return _table(b"DSDT", 2, s5 + aml.scope("\\_SB_", pci_root_bridge(), com1, rtc, keyboard, pvpanic))


def pci_routing_table() -> bytes:
    """_PRT: the IOAPIC pin (GSI) each slot's INTA#-INTD# reaches, for drivers that use no MSI."""
    entries = [
        aml.package(
            aml.integer(slot << 16 | 0xFFFF),
            aml.integer(pin),
            aml.integer(0),
            aml.integer(layout.pci_intx_gsi(slot, pin)),
        )
        for slot in range(1, layout.PCI_SLOTS)
        for pin in range(4)
    ]
    return aml.name("_PRT", aml.package(*entries))


def pci_root_bridge() -> bytes:
    """PCI0: the root bridge of bus 0: bus range, interrupt routing, the windows its BARs may use."""
    return aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_UID", aml.integer(0)),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        pci_routing_table(),
        aml.name(
            "_CRS",
            aml.resource_template(
                aml.word_bus_number(0, layout.PCI_LAST_BUS),
                aml.io_port(layout.PCI_CONFIG_ADDRESS_PORT, 8),
                aml.word_io(0x0000, 0x0CF7),
                aml.word_io(0x0D00, 0xFFFF),
                aml.dword_memory(layout.PCI_MMIO32_START, layout.PCI_MMIO32_END - 1),
            ),
        ),
    )


def build_mcfg() -> bytes:
    """MCFG: where the ECAM window of segment 0 is, for the buses kvmpy has."""
    entry = struct.pack("<QHBBI", layout.PCI_ECAM_START, 0, 0, layout.PCI_LAST_BUS, 0)
    return _table(b"MCFG", 1, bytes(8) + entry)


def build_facs() -> bytes:
    """Firmware ACPI Control Structure: required by non-reduced-hardware FADTs (64 bytes)."""
    return struct.pack("<4sIIIIIBB3sI24s", b"FACS", 64, 0, 0, 0, 0, 2, 0, b"\0" * 3, 0, b"\0" * 24)


def build_fadt(facs: int, dsdt: int) -> bytes:
    pm1_event, pm1_control = layout.ACPI_PM1_EVENT_PORT, layout.ACPI_PM1_CONTROL_PORT
    timer = layout.ACPI_PM_TIMER_PORT
    body = bytearray(276 - HEADER.size)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    put(36, "<II", facs, dsdt)
    put(46, "<H", layout.ACPI_SCI_IRQ)  # SCI_INT; SMI_CMD stays 0: ACPI mode is always on
    put(56, "<I", pm1_event)
    put(64, "<I", pm1_control)
    put(76, "<I", timer)
    put(88, "<BBBB", 4, 2, 0, 4)  # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
    put(96, "<HH", 101, 1001)  # C2/C3 latencies over the limits: no deep C-states
    put(109, "<H", IAPC_LEGACY_DEVICES | IAPC_8042)
    put(112, "<I", FADT_WBINVD | FADT_PROC_C1 | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP)
    put(116, "<12s", _gas(layout.ACPI_RESET_PORT, 8, 1))
    put(128, "<B", layout.ACPI_RESET_VALUE)
    put(131, "<B", 1)  # FADT minor version: 6.1
    put(132, "<QQ", facs, dsdt)  # X_FIRMWARE_CTRL, X_DSDT
    put(148, "<12s", _gas(pm1_event, 32, 2))
    put(172, "<12s", _gas(pm1_control, 16, 2))
    put(208, "<12s", _gas(timer, 32, 3))
    put(268, "<8s", b"KVMPY\0\0\0")  # hypervisor vendor identity
    return _table(b"FACP", 6, bytes(body))


def build_madt(n_cpus: int) -> bytes:
    ioapic_id = n_cpus
    body = struct.pack("<II", layout.LAPIC_START, MADT_PCAT_COMPAT)
    for cpu in range(n_cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, 1)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic_id, 0, layout.IOAPIC_START, 0)
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, 2, 0)  # PIT IRQ 0 -> GSI 2
    body += struct.pack(
        "<BBBBIH",
        MADT_INTERRUPT_OVERRIDE,
        10,
        0,
        layout.ACPI_SCI_IRQ,
        layout.ACPI_SCI_IRQ,
        MPS_ACTIVE_HIGH_LEVEL,
    )
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)  # NMI on LINT1 of every CPU
    return _table(b"APIC", 5, body)


def build_acpi_tables(
    n_cpus: int, base: int = layout.ACPI_TABLES_START, rsdp_at: int = layout.RSDP_START
) -> AcpiTables:
    """All tables laid out from ``base`` upward, the RSDP at ``rsdp_at``."""
    blobs: list[tuple[int, bytes]] = []
    cursor = base

    def place(data: bytes, align: int = 16) -> int:
        nonlocal cursor
        cursor = (cursor + align - 1) & ~(align - 1)
        address = cursor
        blobs.append((address, data))
        cursor += len(data)
        return address

    facs = place(build_facs(), align=64)
    dsdt = place(build_dsdt())
    fadt = place(build_fadt(facs, dsdt))
    madt = place(build_madt(n_cpus))
    mcfg = place(build_mcfg())
    xsdt = place(_table(b"XSDT", 1, struct.pack("<QQQ", fadt, madt, mcfg)))
    if cursor > rsdp_at:
        raise ConfigError(f"ACPI tables for {n_cpus} vCPUs overflow their area")
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, xsdt, 0))
    rsdp[8] = checksum(bytes(rsdp[:20]))
    rsdp[32] = checksum(bytes(rsdp))
    blobs.append((rsdp_at, bytes(rsdp)))
    return AcpiTables(tuple(blobs), rsdp_at)


def write_acpi_tables(mem: GuestMemory, tables: AcpiTables) -> None:
    for address, data in tables.blobs:
        mem.write(address, data)


__all__ = ["AcpiTables", "build_acpi_tables", "write_acpi_tables"]
