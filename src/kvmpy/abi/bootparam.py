"""Offsets in Linux's zero page (struct boot_params) and its setup header.

From Documentation/arch/x86/boot.rst and arch/x86/include/uapi/asm/bootparam.h.
The zero page is handled as bytes with these named offsets: the boot
protocol is defined by offsets in the file, and the setup header has to be
copied verbatim from the kernel image anyway.
"""

from __future__ import annotations

ZERO_PAGE_SIZE = 4096

# struct boot_params fields outside the setup header
ACPI_RSDP_ADDR = 0x070  # u64
EXT_RAMDISK_IMAGE = 0x0C0  # u32
EXT_RAMDISK_SIZE = 0x0C4  # u32
EXT_CMD_LINE_PTR = 0x0C8  # u32
E820_ENTRIES = 0x1E8  # u8
E820_TABLE = 0x2D0  # struct boot_e820_entry[128]: u64 addr, u64 size, u32 type (packed, 20 bytes)
E820_MAX_ENTRIES = 128
E820_ENTRY_SIZE = 20

# struct setup_header (starts at 0x1f1)
SETUP_HEADER_START = 0x1F1
SETUP_SECTS = 0x1F1  # u8
BOOT_FLAG = 0x1FE  # u16, 0xAA55
HEADER_END_OFFSET = 0x201  # u8: the header runs to 0x202 + this byte
HEADER_MAGIC = 0x202  # "HdrS"
VERSION = 0x206  # u16
TYPE_OF_LOADER = 0x210  # u8
LOADFLAGS = 0x211  # u8
RAMDISK_IMAGE = 0x218  # u32
RAMDISK_SIZE = 0x21C  # u32
HEAP_END_PTR = 0x224  # u16
CMD_LINE_PTR = 0x228  # u32
INITRD_ADDR_MAX = 0x22C  # u32
KERNEL_ALIGNMENT = 0x230  # u32
RELOCATABLE_KERNEL = 0x234  # u8
XLOADFLAGS = 0x236  # u16
CMDLINE_SIZE = 0x238  # u32
PREF_ADDRESS = 0x258  # u64
INIT_SIZE = 0x260  # u32

HDRS_MAGIC = b"HdrS"
LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
TYPE_OF_LOADER_UNDEFINED = 0xFF
