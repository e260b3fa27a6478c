"""The live-migration wire protocol: framed, checksummed, acknowledged messages.

Every message is a frame::

    kind      u32   one of Kind
    length    u64   payload bytes (at most MAX_PAYLOAD)
    payload
    crc32     u32   of the payload

The source sends START (the protocol version), CONFIG (what to build),
MEMORY (runs of pages, in rounds while the guest runs), STATE (the device
and CPU sections, once the guest is paused) and COMPLETE; the destination
answers START, CONFIG, every round's end (ROUND_END) and COMPLETE with ACK
or ERROR. ABANDON, from either side, ends the migration: the source keeps
its guest. Cloud Hypervisor's vm-migration protocol is the model; here
every frame carries a checksum and the payload size is capped, so a broken
or hostile peer costs an error, not memory.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from kvmpy.state.errors import StateError

if TYPE_CHECKING:
    from kvmpy.memory.guest_memory import MemoryRegion

VERSION = 1
#: The largest payload a peer may announce: a state section set or 16 MiB of pages.
MAX_PAYLOAD = 64 << 20
_HEADER = struct.Struct("<IQ")
_TRAILER = struct.Struct("<I")
#: A MEMORY payload: region index, first page, page count, then the pages.
PAGES_HEADER = struct.Struct("<IQI")


class Kind(IntEnum):
    START = 1
    CONFIG = 2
    MEMORY = 3
    ROUND_END = 4
    STATE = 5
    COMPLETE = 6
    ABANDON = 7
    ACK = 8
    ERROR = 9


class MigrationError(StateError):
    """The migration failed; the message says where and why."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: Kind
    payload: bytes


class Channel:
    """Frames over one connected stream socket."""

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.sent = 0

    def send(self, kind: Kind, payload: bytes | memoryview = b"") -> None:
        header = _HEADER.pack(int(kind), len(payload))
        trailer = _TRAILER.pack(zlib.crc32(payload))
        try:
            self.sock.sendall(header)
            self.sock.sendall(payload)
            self.sock.sendall(trailer)
        except OSError as error:
            raise MigrationError(f"lost the connection to {self.peer}: {error.strerror or error}") from None
        self.sent += len(header) + len(payload) + len(trailer)

    def receive(self) -> Frame:
        kind, length = _HEADER.unpack(self._exactly(_HEADER.size))
        if length > MAX_PAYLOAD:
            raise MigrationError(
                f"{self.peer} announced a {length}-byte message (the limit is {MAX_PAYLOAD})"
            )
        try:
            typed = Kind(kind)
        except ValueError:
            raise MigrationError(f"{self.peer} sent a message of unknown kind {kind}") from None
        payload = self._exactly(length)
        (checksum,) = _TRAILER.unpack(self._exactly(_TRAILER.size))
        if zlib.crc32(payload) != checksum:
            raise MigrationError(f"a {typed.name} message from {self.peer} is corrupted (CRC mismatch)")
        return Frame(typed, payload)

    def expect(self, kind: Kind) -> bytes:
        """The next frame's payload, which must be ``kind`` (an ERROR or ABANDON says why not)."""
        frame = self.receive()
        if frame.kind in (Kind.ERROR, Kind.ABANDON):
            raise MigrationError(f"{self.peer}: {frame.payload.decode(errors='replace')}")
        if frame.kind is not kind:
            raise MigrationError(f"{self.peer} sent {frame.kind.name} where {kind.name} belongs")
        return frame.payload

    def _exactly(self, size: int) -> bytes:
        chunks, missing = [], size
        while missing:
            try:
                chunk = self.sock.recv(min(missing, 1 << 20))
            except OSError as error:
                raise MigrationError(
                    f"lost the connection to {self.peer}: {error.strerror or error}"
                ) from None
            if not chunk:
                raise MigrationError(f"{self.peer} closed the connection")
            chunks.append(chunk)
            missing -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def parse_address(text: str) -> tuple[int, object, str]:
    """``tcp:HOST:PORT`` or ``unix:PATH`` as (socket family, address, text for messages)."""
    kind, _, rest = text.partition(":")
    if kind == "unix" and rest:
        return socket.AF_UNIX, rest, text
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            return socket.AF_INET6 if ":" in host else socket.AF_INET, (host.strip("[]"), int(port)), text
    raise MigrationError(f"invalid migration address {text!r}: use tcp:HOST:PORT or unix:PATH")


#: Set on the source (to anything but "" or "0"), COMPLETE carries a digest of the paused
#: guest's whole RAM, and the destination compares its own before it runs the guest: a check
#: for tests (it adds the time to hash all of RAM twice to the downtime).
CHECK_MEMORY_ENV = "KVMPY_MIGRATION_CHECK"


def checking_memory() -> bool:
    return os.environ.get(CHECK_MEMORY_ENV, "") not in ("", "0")


def memory_digest(regions: Iterable[MemoryRegion]) -> bytes:
    """BLAKE2b of guest RAM, region after region."""
    digest = hashlib.blake2b(digest_size=32)
    for region in regions:
        digest.update(region.view)
    return digest.digest()


__all__ = [
    "CHECK_MEMORY_ENV",
    "checking_memory",
    "memory_digest",
    "MAX_PAYLOAD",
    "PAGES_HEADER",
    "VERSION",
    "Channel",
    "Frame",
    "Kind",
    "MigrationError",
    "parse_address",
]
