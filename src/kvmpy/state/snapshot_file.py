"""The snapshot state file: a header, versioned sections, a checksum.

Layout (little-endian)::

    magic      8 bytes   b"KVMPYSNP"
    arch       8 bytes   b"x86_64" padded with NULs
    version    u32       the container's format version (FORMAT_VERSION)
    reserved   u32       0
    length     u64       bytes of payload that follow
    payload    msgpack   {section name: [section version, section bytes]}
    checksum   32 bytes  SHA-256 of everything before it

Each component encodes its own section (msgpack of its frozen dataclass) and
gives it its own version, so a component that grows a field bumps only its
section. The whole file is capped at MAX_STATE_FILE bytes: it holds device
and CPU state only (guest RAM is the separate memory file), and the cap
keeps a hostile file from costing more than that to read.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from kvmpy.state.errors import StateError

MAGIC = b"KVMPYSNP"
ARCH = b"x86_64".ljust(8, b"\0")
FORMAT_VERSION = 1
MAX_STATE_FILE = 64 << 20
_HEADER = struct.Struct("<8s8sIIQ")
_CHECKSUM_SIZE = 32

_T = TypeVar("_T")


class Section(msgspec.Struct, array_like=True, frozen=True):
    version: int
    data: bytes


def encode(value: object) -> bytes:
    """A component's state (a frozen dataclass of ints, bytes, tuples) as section bytes."""
    return msgspec.msgpack.encode(value)


def decode(name: str, data: bytes, kind: type[_T]) -> _T:
    """Section bytes back to ``kind``, with every field's type checked."""
    try:
        return msgspec.msgpack.decode(data, type=kind)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise StateError(f"snapshot section {name}: {error}") from None


def write_state_file(path: Path, sections: dict[str, Section]) -> int:
    """Write ``sections`` to ``path`` atomically (a temporary file renamed); returns its size."""
    payload = msgspec.msgpack.encode(sections)
    header = _HEADER.pack(MAGIC, ARCH, FORMAT_VERSION, 0, len(payload))
    body = header + payload
    data = body + hashlib.sha256(body).digest()
    if len(data) > MAX_STATE_FILE:
        raise StateError(f"the state is {len(data)} bytes, over the {MAX_STATE_FILE >> 20} MiB cap")
    temporary = path.with_name(path.name + ".partial")
    try:
        with temporary.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        temporary.replace(path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise StateError(f"cannot write the snapshot {path}: {error.strerror}") from None
    return len(data)


def read_state_file(path: Path) -> dict[str, Section]:
    """The sections of the state file at ``path``; StateError says what is wrong with it."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_STATE_FILE + 1)
    except OSError as error:
        raise StateError(f"cannot read the snapshot {path}: {error.strerror}") from None
    return parse_state(data, str(path))


def parse_state(data: bytes, name: str = "the snapshot") -> dict[str, Section]:
    if len(data) > MAX_STATE_FILE:
        raise StateError(f"{name} is larger than the {MAX_STATE_FILE >> 20} MiB a state file may be")
    if len(data) < _HEADER.size + _CHECKSUM_SIZE:
        raise StateError(f"{name} is truncated ({len(data)} bytes): not a kvmpy snapshot")
    magic, arch, version, _, length = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise StateError(f"{name} is not a kvmpy snapshot (bad magic number)")
    if arch != ARCH:
        taken_on = arch.rstrip(b"\0").decode(errors="replace")
        raise StateError(f"{name} was taken on {taken_on}, not x86_64")
    if version != FORMAT_VERSION:
        raise StateError(f"{name} has format version {version}; this kvmpy reads version {FORMAT_VERSION}")
    end = _HEADER.size + length
    if end + _CHECKSUM_SIZE != len(data):
        expected = end + _CHECKSUM_SIZE
        raise StateError(f"{name} is truncated or has trailing bytes ({len(data)} bytes, not {expected})")
    if hashlib.sha256(data[:end]).digest() != data[end:]:
        raise StateError(f"{name} is corrupted (checksum mismatch)")
    try:
        payload = data[_HEADER.size : end]
        sections: dict[str, Section] = msgspec.msgpack.decode(payload, type=dict[str, Section])
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise StateError(f"{name}: malformed sections: {error}") from None
    return sections


def section(sections: dict[str, Section], name: str, kind: type[_T], versions: tuple[int, ...]) -> _T:
    """Section ``name`` decoded as ``kind``, if its version is one this kvmpy reads."""
    found = sections.get(name)
    if found is None:
        raise StateError(f"the snapshot has no {name} section")
    if found.version not in versions:
        raise StateError(f"snapshot section {name} has version {found.version}; this kvmpy reads {versions}")
    return decode(name, found.data, kind)


def describe(sections: dict[str, Section]) -> list[tuple[str, int, int]]:
    """(name, version, size) of every section, for ``kvmpy snapshot inspect``."""
    return [(name, s.version, len(s.data)) for name, s in sorted(sections.items())]


def plain(value: Any) -> Any:
    """A decoded section as JSON-ready data (bytes shown by size), for inspection."""
    return msgspec.to_builtins(value, enc_hook=None, builtin_types=None)


__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_STATE_FILE",
    "Section",
    "decode",
    "describe",
    "encode",
    "parse_state",
    "read_state_file",
    "section",
    "write_state_file",
]
