"""Busybox initramfs images with kernel modules and an init script, for both lab levels."""

from __future__ import annotations

from pathlib import Path

from kvmpy.lab import cpio
from kvmpy.lab.modules import KernelTree, load_order, read_module

BUSYBOX_PATH = Path("bin/busybox")


def build_initramfs(busybox_root: Path, tree: KernelTree, modules: list[str], init_script: str) -> bytes:
    """A gzipped newc archive: busybox, the modules in load order, /init and a console node.

    The load order is in /modules.list ("name file" per line) for the init
    script to follow.
    """
    busybox = busybox_root / BUSYBOX_PATH
    members = [cpio.directory(name) for name in ("bin", "dev", "proc", "sys", "tmp", "run", "mnt", "modules")]
    members += [
        cpio.char_device("dev/console", 5, 1),
        cpio.char_device("dev/null", 1, 3),
        cpio.regular("bin/busybox", busybox.read_bytes(), executable=True),
        cpio.symlink("bin/sh", "busybox"),
        cpio.regular("init", init_script.encode(), executable=True),
    ]
    listing = []
    for position, (name, path) in enumerate(load_order(tree, modules)):
        file_name = f"{position:02d}-{name}.ko"
        members.append(cpio.regular(f"modules/{file_name}", read_module(path)))
        listing.append(f"{name} {file_name}")
    members.append(cpio.regular("modules.list", ("\n".join(listing) + "\n").encode()))
    return cpio.gzipped(members)


__all__ = ["build_initramfs"]
