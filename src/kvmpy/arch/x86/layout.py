"""Every guest-physical address, port and IRQ number kvmpy chooses, in one place.

Nothing else in kvmpy hard-codes a guest address: loaders, firmware tables and
the machine builder import them from here, so the guest's memory map can be
read top to bottom in this file.
"""

from __future__ import annotations

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# --- low memory (real-mode area) -------------------------------------------------
#: Start of RAM. The whole of guest RAM begins at GPA 0.
RAM_START = 0x0
#: Global descriptor table the VMM builds for the boot vCPU.
BOOT_GDT_START = 0x500
#: Interrupt descriptor table (empty) loaded at boot.
BOOT_IDT_START = 0x520
#: PVH start_info structure (struct hvm_start_info) and its memory map.
PVH_START_INFO = 0x6000
PVH_MODLIST_START = 0x6040
PVH_MEMMAP_START = 0x6100
PVH_MEMMAP_MAX_ENTRIES = 32
#: Linux boot: the zero page (struct boot_params).
ZERO_PAGE_START = 0x7000
#: Boot stack top for the boot vCPU.
BOOT_STACK_POINTER = 0x8FF0
#: Boot page tables (PML4, PDPT, PDs) built by the VMM for 64-bit entry.
PML4_START = 0x9000
PDPTE_START = 0xA000
PDE_START = 0xB000  # four pages: identity map of the first 4 GiB with 2 MiB pages
#: Kernel command line.
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
#: MP floating pointer and table live in the EBDA area.
EBDA_START = 0x9FC00
#: Top of conventional memory (the legacy VGA/BIOS hole starts here).
LOW_MEMORY_END = 0xA0000
#: BIOS area where ACPI tables and the RSDP go (the kernel scans 0xE0000-0xFFFFF for the RSDP).
BIOS_AREA_START = 0xE0000
ACPI_TABLES_START = 0xE0000
RSDP_START = 0xF0000 - 0x100
#: Intel MP table: floating pointer and configuration table (Linux scans 0xF0000-0xFFFFF).
MPTABLE_START = 0xF0000
MPTABLE_END = 0x100000
BIOS_AREA_END = 0x100000

# --- high memory ---------------------------------------------------------------------
#: Where kernels are loaded when their headers do not say otherwise.
HIGH_MEMORY_START = 0x100000
#: Flat binaries are loaded here by default.
FLAT_LOAD_ADDRESS = 0x100000

# --- the 32-bit MMIO hole -------------------------------------------------------------
#: RAM above this address is moved above 4 GiB; the hole is left for device MMIO.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
#: kvmpy has one PCI bus and no bridges. Firmware tables say so (MCFG end bus, the root
#: bridge's bus range): Linux scans every bus the MCFG covers for peer host bridges through
#: ports 0xCF8/0xCFC, 16,000 exits for 255 empty buses.
PCI_LAST_BUS = 0
#: PCI ECAM window: 1 MiB per bus (32 devices x 8 functions x 4 KiB).
PCI_ECAM_START = 0xE000_0000
PCI_ECAM_SIZE = (PCI_LAST_BUS + 1) << 20
#: 32-bit PCI BAR window; kvmpy places each device's BARs in its own 64 KiB slice.
PCI_MMIO32_START = 0xC000_0000
PCI_MMIO32_END = 0xE000_0000
PCI_DEVICE_WINDOW = 0x1_0000


def pci_bar_window(slot: int) -> int:
    """Start of the 64 KiB of BAR space kvmpy gives PCI slot ``slot`` at boot."""
    return PCI_MMIO32_START + slot * PCI_DEVICE_WINDOW


#: BARs of assigned (VFIO) devices: a real device's BARs outgrow a 64 KiB slice, so they
#: share the upper half of the 32-bit window (above every slot's slice, below the ECAM),
#: each naturally aligned, 64-bit BARs included (Linux takes them below 4 GiB).
PCI_ASSIGNED_BARS_START = 0xD000_0000
PCI_ASSIGNED_BARS_END = PCI_MMIO32_END
PCI_SLOTS_WITH_SLICES = 32
#: I/O BARs of assigned devices (an e1000e has one): ports the root bridge's _CRS gives PCI,
#: above every legacy device kvmpy has.
PCI_ASSIGNED_IO_START = 0xC000
PCI_ASSIGNED_IO_END = 0x1_0000
assert pci_bar_window(PCI_SLOTS_WITH_SLICES) <= PCI_ASSIGNED_BARS_START


#: Legacy PCI interrupts (INTx) use IOAPIC pins 16-23, level-triggered and shared,
#: spread over slots and pins as the PCI-to-PCI bridge swizzle does; ACPI _PRT says so.
PCI_SLOTS = 32
PCI_INTX_FIRST_GSI = 16
PCI_INTX_GSIS = 8


def pci_intx_gsi(slot: int, pin: int) -> int:
    """The GSI of INTA# (pin 0) to INTD# (pin 3) of the function in ``slot``."""
    return PCI_INTX_FIRST_GSI + (slot + pin) % PCI_INTX_GSIS


#: IOAPIC and local APIC default addresses (in-kernel when KVM_CREATE_IRQCHIP is used).
IOAPIC_START = 0xFEC0_0000
LAPIC_START = 0xFEE0_0000
#: KVM's TSS and identity-map pages (needed on Intel); just below the BIOS ROM area.
KVM_IDENTITY_MAP_START = 0xFFFB_C000
KVM_TSS_START = 0xFFFB_D000
#: RAM that would overlap the hole restarts here.
HIGH_RAM_START = 0x1_0000_0000

# --- legacy I/O ports and ISA IRQs -----------------------------------------------------
COM1_PORT = 0x3F8
COM1_IRQ = 4
COM2_PORT = 0x2F8
COM2_IRQ = 3
DEBUG_EXIT_PORT = 0x501
PVPANIC_PORT = 0x505
POST_CODE_PORT = 0x80
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_KBD_IRQ = 1
RTC_PORT = 0x70
RTC_IRQ = 8
ACPI_PM1_EVENT_PORT = 0x600  # PM1a event block (status + enable), 4 bytes
ACPI_PM1_CONTROL_PORT = 0x604  # PM1a control block, 2 bytes
ACPI_PM_TIMER_PORT = 0x608
ACPI_RESET_PORT = 0x60C  # FADT RESET_REG (part of the ACPI PM device's block)
ACPI_RESET_VALUE = 0x06
ACPI_SCI_IRQ = 9
PCI_CONFIG_ADDRESS_PORT = 0xCF8
PCI_CONFIG_DATA_PORT = 0xCFC


def ram_ranges(ram_size: int) -> list[tuple[int, int]]:
    """Split ``ram_size`` bytes of guest RAM around the MMIO hole.

    Returns ``(gpa, size)`` pairs: RAM from 0 up to the hole, and the rest (if
    any) from 4 GiB up.
    """
    if ram_size <= 0:
        raise ValueError("RAM size must be positive")
    below = min(ram_size, MMIO_HOLE_START)
    ranges = [(RAM_START, below)]
    if ram_size > below:
        ranges.append((HIGH_RAM_START, ram_size - below))
    return ranges
