"""A writer for the "newc" cpio format the kernel unpacks as an initramfs.

Each member is a 110-byte ASCII header (magic 070701 and thirteen 8-digit hex
fields), the NUL-terminated name, padding to 4 bytes, the data, padding to 4
bytes; a member named TRAILER!!! ends the archive.
"""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Member:
    name: str
    mode: int
    data: bytes = b""
    device: tuple[int, int] = (0, 0)  # major, minor for device nodes


def directory(name: str) -> Member:
    return Member(name, stat.S_IFDIR | 0o755)


def regular(name: str, data: bytes, executable: bool = False) -> Member:
    return Member(name, stat.S_IFREG | (0o755 if executable else 0o644), data)


def symlink(name: str, target: str) -> Member:
    return Member(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int) -> Member:
    return Member(name, stat.S_IFCHR | 0o600, device=(major, minor))


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(inode: int, member: Member) -> bytes:
    encoded = member.name.encode() + b"\0"
    major, minor = member.device
    fields = [inode, member.mode, 0, 0, 1, 0, len(member.data), 0, 0, major, minor, len(encoded), 0]
    header = b"070701" + b"".join(f"{field:08X}".encode() for field in fields)
    return header + encoded + _pad(len(header) + len(encoded))


def archive(members: list[Member]) -> bytes:
    """The uncompressed archive."""
    out = bytearray()
    for inode, member in enumerate([*members, Member("TRAILER!!!", 0)], start=1):
        out += _header(inode, member)
        out += member.data + _pad(len(member.data))
    return bytes(out)


def gzipped(members: list[Member]) -> bytes:
    return gzip.compress(archive(members), compresslevel=6, mtime=0)


__all__ = ["Member", "archive", "char_device", "directory", "gzipped", "regular", "symlink"]
