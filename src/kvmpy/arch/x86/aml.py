"""A tiny encoder for the ACPI Machine Language, just what kvmpy's DSDT needs.

AML is a byte code: named objects, packages and buffers with a variable-length
"package length" prefix (ACPI 6.x, chapter 20). Each helper here returns the
encoded bytes of one term.
"""

from __future__ import annotations

import struct

ZERO_OP = 0x00
ONE_OP = 0x01
NAME_OP = 0x08
BYTE_PREFIX = 0x0A
WORD_PREFIX = 0x0B
DWORD_PREFIX = 0x0C
QWORD_PREFIX = 0x0E
SCOPE_OP = 0x10
BUFFER_OP = 0x11
PACKAGE_OP = 0x12
EXT_OP_PREFIX = 0x5B
DEVICE_OP = 0x82
ROOT_CHAR = b"\\"
DUAL_NAME_PREFIX = 0x2E


def pkg_length(body_length: int) -> bytes:
    """PkgLength for a body of ``body_length`` bytes (the length counts itself)."""
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 0x40:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([lead]) + rest
    raise ValueError("AML object too large")


def name_seg(name: str) -> bytes:
    """A 4-character NameSeg, padded with underscores."""
    if not 1 <= len(name) <= 4:
        raise ValueError(f"bad AML name segment {name!r}")
    return name.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A name such as ``_S5_``, ``\\_SB_`` or ``\\_SB_.COM1``."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = ROOT_CHAR, path[1:]
    segments = [name_seg(part) for part in path.split(".")]
    if len(segments) == 1:
        return prefix + segments[0]
    if len(segments) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segments)
    return prefix + bytes([0x2F, len(segments)]) + b"".join(segments)


def integer(value: int) -> bytes:
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value <= 0xFF:
        return bytes([BYTE_PREFIX, value])
    if value <= 0xFFFF:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value <= 0xFFFF_FFFF:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    return b"\x0d" + text.encode("ascii") + b"\0"


def eisa_id(text: str) -> bytes:
    """EISAID("PNP0501"): three compressed letters and four hex digits, as a DWord."""
    letters = [ord(c) - 0x40 for c in text[:3]]
    first = (letters[0] << 10) | (letters[1] << 5) | letters[2]
    value = struct.pack(">HH", first, int(text[3:], 16))
    return integer(int.from_bytes(value, "little"))


def name(path: str, value: bytes) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + value


def package(*elements: bytes) -> bytes:
    body = bytes([len(elements)]) + b"".join(elements)
    return bytes([PACKAGE_OP]) + pkg_length(len(body)) + body


def buffer(data: bytes) -> bytes:
    body = integer(len(data)) + data
    return bytes([BUFFER_OP]) + pkg_length(len(body)) + body


def scope(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([SCOPE_OP]) + pkg_length(len(body)) + body


def device(path: str, *terms: bytes) -> bytes:
    body = name_string(path) + b"".join(terms)
    return bytes([EXT_OP_PREFIX, DEVICE_OP]) + pkg_length(len(body)) + body


# --- resource templates (ACPI 6.x, 6.4 "Resource Data Types") ---------------------------
def io_port(base: int, length: int) -> bytes:
    """IO(Decode16, base, base, 1, length): small I/O port descriptor."""
    return struct.pack("<BBHHBB", 0x47, 0x01, base, base, 1, length)


def irq_no_flags(irq: int) -> bytes:
    """IRQNoFlags(){irq}: edge-triggered, active-high ISA interrupt."""
    return struct.pack("<BH", 0x22, 1 << irq)


# Address space descriptors, as a resource producer (a bridge window) with fixed bounds.
_PRODUCER_FIXED = 0x0C  # _MAF | _MIF, positive decode, producer
_SPACE_MEMORY, _SPACE_IO, _SPACE_BUS = 0, 1, 2


def _word_address(space: int, type_flags: int, minimum: int, maximum: int) -> bytes:
    body = struct.pack(
        "<BBBHHHHH", space, _PRODUCER_FIXED, type_flags, 0, minimum, maximum, 0, maximum - minimum + 1
    )
    return struct.pack("<BH", 0x88, len(body)) + body


def word_bus_number(minimum: int, maximum: int) -> bytes:
    """WordBusNumber(ResourceProducer, MinFixed, MaxFixed, ...): the buses behind a bridge."""
    return _word_address(_SPACE_BUS, 0, minimum, maximum)


def word_io(minimum: int, maximum: int) -> bytes:
    """WordIO(ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...)."""
    return _word_address(_SPACE_IO, 0x03, minimum, maximum)


def dword_memory(minimum: int, maximum: int) -> bytes:
    """DWordMemory(ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, ...)."""
    body = struct.pack(
        "<BBBIIIII", _SPACE_MEMORY, _PRODUCER_FIXED, 0x01, 0, minimum, maximum, 0, maximum - minimum + 1
    )
    return struct.pack("<BH", 0x87, len(body)) + body


def resource_template(*descriptors: bytes) -> bytes:
    """A ResourceTemplate buffer, terminated by an end tag with a zero checksum."""
    return buffer(b"".join(descriptors) + b"\x79\x00")


__all__ = [
    "device",
    "dword_memory",
    "eisa_id",
    "integer",
    "io_port",
    "irq_no_flags",
    "name",
    "package",
    "pkg_length",
    "resource_template",
    "scope",
    "string",
    "word_bus_number",
    "word_io",
]
