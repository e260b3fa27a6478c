"""``kvmpy run --jail``: the host files its arguments name, bound into the jail's root.

Each file named on the command line (kernel, initrd, disks, a console file, a snapshot
directory) is bind-mounted at ``/<name>`` in the root, read-only unless the VMM
writes it, and the argument is rewritten to that path. Sockets the VMM creates (the
API's, a console's) are made inside the root; a symlink at the path the user gave
leads there, since the jailed VMM can no longer reach the host's path itself.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
from pathlib import Path

from kvmpy.errors import ConfigError
from kvmpy.jail.chroot import Bind
from kvmpy.vmm.config import DiskConfig


class _Names:
    """Names inside the root: a file's own name, numbered if two files share it."""

    def __init__(self) -> None:
        self._taken: set[str] = set()

    def take(self, path: Path) -> str:
        name, number = path.name, 2
        while name in self._taken:
            name, number = f"{number}-{path.name}", number + 1
        self._taken.add(name)
        return name


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise ConfigError(f"{what} {path}: no such file")
    return path.resolve()


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket a VMM of the same id left in its jail when it ended (killed, say); one that
    still answers belongs to a VMM that runs: that is an error, not something to take over."""
    if not path.is_socket():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        path.unlink()
        return
    except OSError:
        return  # the VMM reports what is wrong with the path when it binds
    finally:
        probe.close()
    raise ConfigError(f"{path} answers: a VMM with this id runs in this jail already")


def _link_socket(host: Path, root: Path, inside: str) -> None:
    """A symlink at ``host`` to the socket the jailed VMM will make at ``/<inside>``."""
    _clear_stale_socket(root / inside)
    try:
        info = os.lstat(host)
        if stat.S_ISLNK(info.st_mode) or stat.S_ISSOCK(info.st_mode):
            os.unlink(host)
        else:
            raise ConfigError(f"{host} exists and is not a socket")
    except FileNotFoundError:
        pass
    os.symlink(root / inside, host)


def bind_run_files(args: argparse.Namespace, root: Path, uid: int, gid: int) -> tuple[Bind, ...]:
    """The binds for ``args`` (rewritten in place); a console file that does not exist yet is
    made for the VMM's user (``uid``, ``gid``), who must be able to read (and write) the others."""
    if args.config_file is not None:
        raise ConfigError(
            "--config-file names files the jail cannot see: use `kvmpy jailer` with paths inside the jail"
        )
    names, binds = _Names(), []

    def bind(path: Path, what: str, writable: bool = False) -> str:
        host = _existing(path, what)
        inside = names.take(host)
        binds.append(Bind(host, inside, writable))
        return "/" + inside

    if args.kernel is not None:
        args.kernel = Path(bind(args.kernel, "--kernel"))
    if args.initrd is not None:
        args.initrd = Path(bind(args.initrd, "--initrd"))
    if args.restore is not None:
        args.restore = Path(bind(args.restore, "--restore"))
    disks = []
    for text in args.disk:
        disk = DiskConfig.parse(text)
        _path, comma, options = text.partition(",")
        disks.append(bind(disk.path, "--disk", writable=not disk.read_only) + comma + options)
    args.disk = disks
    mode, _colon, target = args.serial.partition(":")
    if mode == "file" and target:
        if not Path(target).exists():
            Path(target).touch()
            os.chown(target, uid, gid)
        args.serial = "file:" + bind(Path(target), "--serial file:", writable=True)
    elif mode == "unix" and target:
        inside = names.take(Path(target))
        _link_socket(Path(target), root, inside)
        args.serial = f"unix:/{inside}"
    if args.api_sock is not None:
        inside = names.take(args.api_sock)
        _link_socket(args.api_sock, root, inside)
        args.api_sock = Path("/" + inside)
    return tuple(binds)
