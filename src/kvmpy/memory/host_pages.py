"""The last step of GVA -> GPA -> HVA -> HPA: which host physical frame backs a VMM address.

Guest RAM is ordinary memory of the VMM process, so the host kernel's page
tables map each host virtual address (HVA) of it to a host physical frame,
and Linux shows that mapping in /proc/self/pagemap: one 64-bit entry per
virtual page (Documentation/admin-guide/mm/pagemap.rst). Since Linux 4.2 the
frame number reads as 0 unless the reader has CAP_SYS_ADMIN (frame numbers
help Rowhammer attacks), so the answer says when the host hides it and why.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

PAGEMAP = "/proc/self/pagemap"
_PFN_MASK = (1 << 55) - 1
_SOFT_DIRTY = 1 << 55
_EXCLUSIVE = 1 << 56
_FILE_OR_SHARED = 1 << 61
_SWAPPED = 1 << 62
_PRESENT = 1 << 63
_CAP_SYS_ADMIN = 21


@dataclass(frozen=True, slots=True)
class HostFrame:
    """What the host's page tables say about one page of the VMM's address space."""

    hva: int
    present: bool
    swapped: bool = False
    pfn: int | None = None
    #: Why there is no frame number, when there is none.
    note: str | None = None
    exclusive: bool = False
    soft_dirty: bool = False

    @property
    def hpa(self) -> int | None:
        """The host physical address of ``hva`` (frame base plus the offset in the page)."""
        if self.pfn is None:
            return None
        return self.pfn * mmap.PAGESIZE + self.hva % mmap.PAGESIZE

    def as_dict(self) -> dict[str, Any]:
        return {
            "hva": self.hva,
            "present": self.present,
            "swapped": self.swapped,
            "pfn": self.pfn,
            "hpa": self.hpa,
            "note": self.note,
            "exclusive": self.exclusive,
            "soft_dirty": self.soft_dirty,
        }


def has_cap_sys_admin(status_path: str = "/proc/self/status") -> bool:
    """Whether this process has CAP_SYS_ADMIN in its effective set."""
    try:
        with open(status_path) as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


def decode_entry(hva: int, entry: int, privileged: bool) -> HostFrame:
    """A HostFrame from one pagemap entry; ``privileged``: the reader has CAP_SYS_ADMIN."""
    present = bool(entry & _PRESENT)
    swapped = bool(entry & _SWAPPED)
    flags = {"exclusive": bool(entry & _EXCLUSIVE), "soft_dirty": bool(entry & _SOFT_DIRTY)}
    if swapped:
        return HostFrame(hva, present, True, None, "swapped out by the host", **flags)
    if not present:
        note = "not backed yet: the host allocates a frame when the page is first touched"
        return HostFrame(hva, False, False, None, note, **flags)
    pfn = entry & _PFN_MASK
    if pfn == 0:
        why = (
            "hidden by the host: the frame number reads as 0 even with CAP_SYS_ADMIN"
            " (a container or hardened kernel)"
            if privileged
            else "hidden by the host: Linux shows frame numbers only to CAP_SYS_ADMIN"
            " (since 4.2, against Rowhammer)"
        )
        return HostFrame(hva, True, False, None, why, **flags)
    return HostFrame(hva, True, False, pfn, None, **flags)


def host_frame(hva: int, pagemap: str = PAGEMAP) -> HostFrame:
    """The host frame behind ``hva`` in this process, or a HostFrame saying why it is unknown."""
    try:
        fd = os.open(pagemap, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        return HostFrame(hva, False, note=f"hidden by the host: cannot open {pagemap}: {error.strerror}")
    try:
        raw = os.pread(fd, 8, (hva // mmap.PAGESIZE) * 8)
    except OSError as error:
        return HostFrame(hva, False, note=f"hidden by the host: cannot read {pagemap}: {error.strerror}")
    finally:
        os.close(fd)
    if len(raw) != 8:
        return HostFrame(hva, False, note=f"{pagemap} has no entry for {hva:#x}")
    return decode_entry(hva, struct.unpack("<Q", raw)[0], has_cap_sys_admin())


__all__ = ["HostFrame", "decode_entry", "has_cap_sys_admin", "host_frame"]
