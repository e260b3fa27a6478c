"""The jail's file system: ``<base>/<exec-name>/<id>/root`` as ``/``, and nothing else.

The steps are Firecracker's jailer's: a private mount namespace, the root
bind-mounted on itself, ``pivot_root`` into it, the old root detached; then the
device nodes the VMM opens (/dev/kvm, /dev/net/tun) made with ``mknod`` and
given to the VMM's user, as is the root (so the API socket can be created in it).
Host files the VMM was given on the command line (``kvmpy run --jail``) are
bind-mounted into the root one by one before the pivot, read-only unless the VMM
writes them (a writable disk, a console file).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from kvmpy.errors import ConfigError
from kvmpy.jail import libc

#: Device nodes the VMM opens inside the jail, where the host has them: path, and what for.
DEVICE_NODES = (("dev/kvm", "KVM"), ("dev/net/tun", "taps"))


@dataclass(frozen=True)
class Bind:
    """A host file that appears at ``inside`` (a path relative to the jail's root)."""

    host: Path
    inside: str
    writable: bool


def make_root(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create the jail at {root}: {error.strerror}") from None


def host_devices() -> list[tuple[str, int]]:
    """The device numbers of the host's nodes, read before the host's /dev is out of reach."""
    found = []
    for relative, _what in DEVICE_NODES:
        try:
            info = os.stat("/" + relative)
        except FileNotFoundError:
            continue
        if stat.S_ISCHR(info.st_mode):
            found.append((relative, info.st_rdev))
    return found


def _bind(root: Path, bind: Bind) -> None:
    target = root / bind.inside
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.touch()
    libc.mount(str(bind.host), str(target), None, libc.MS_BIND)
    if not bind.writable:
        flags = libc.MS_BIND | libc.MS_REMOUNT | libc.MS_RDONLY | libc.MS_NOSUID | libc.MS_NODEV
        libc.mount(None, str(target), None, flags)


def pivot_into(root: Path, binds: tuple[Bind, ...] = ()) -> None:
    """In a new mount namespace (the caller unshared it): make ``root`` the file system root."""
    libc.mount(None, "/", None, libc.MS_PRIVATE | libc.MS_REC)
    libc.mount(str(root), str(root), None, libc.MS_BIND | libc.MS_REC)
    for bind in binds:
        _bind(root, bind)
    os.chdir(root)
    old_root = "old_root"
    os.makedirs(old_root, exist_ok=True)
    libc.pivot_root(".", old_root)
    os.chdir("/")
    libc.umount2("/" + old_root, libc.MNT_DETACH)
    os.rmdir("/" + old_root)
    os.chroot(".")


def make_devices(devices: list[tuple[str, int]], uid: int, gid: int) -> None:
    """mknod the nodes inside the jail (root now), owned by the VMM's user, mode 0600."""
    for relative, rdev in devices:
        path = "/" + relative
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        os.mknod(path, stat.S_IFCHR | 0o600, rdev)
        os.chown(path, uid, gid)
