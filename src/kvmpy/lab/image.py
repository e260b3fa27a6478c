"""Guest images for ``kvmpy run``: a Debian kernel and a busybox initramfs.

The image's init mounts /proc, /sys and /dev, loads the modules for kvmpy's
devices in dependency order, prints ``kvmpy-init: ready``, then runs the
command passed on the kernel command line as ``kvmpy.cmd=BASE64`` (base64 of a
shell command, so it survives the command line's whitespace splitting) and
powers off, or starts a shell on the console when there is none. With
``kvmpy.root=DEVICE`` it mounts that ext4 disk instead and hands over to the
distribution's /sbin/init (``kvmpy.lab.distro``), which runs the command.

Debian ships only the compressed bzImage; the uncompressed vmlinux (an ELF
with a PVH note) is extracted from it for the PVH boot route.
"""

from __future__ import annotations

import base64
import hashlib
import lzma
import shutil
from dataclasses import dataclass
from pathlib import Path

from kvmpy.lab import LabError, progress
from kvmpy.lab.debian import cache_dir, fetch_package, package_version, resolve_kernel_package
from kvmpy.lab.initramfs import build_initramfs
from kvmpy.lab.modules import KernelTree, load_order

DEFAULT_KERNEL_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: Modules for kvmpy's devices (virtio arrives with the I/O issue; absent ones are skipped).
DEFAULT_MODULES = [
    "pvpanic_mmio",  # reports a guest panic to the VMM (ACPI QEMU0001)
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "virtio_balloon",
    "vmw_vsock_virtio_transport",  # AF_VSOCK over virtio-vsock (brings vsock)
    "virtiofs",  # mount -t virtiofs (brings fuse)
    "crc32c_generic",  # ext4's checksums (a soft dependency modinfo does not list)
    "ext4",
]
READY_MARKER = "kvmpy-init: ready"

GUEST_INIT = r"""#!/bin/sh
# kvmpy guest image init: modules, a ready marker, then kvmpy.cmd or a shell.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r name file; do
    insmod "/modules/$file" 2>/dev/null || echo "kvmpy-init: module $name did not load"
done < /modules.list
# The kernel opened init's console before virtio_console existed: with console=hvc0 that
# open failed. Now that the modules are in, open it again (a no-op on ttyS0).
if (: > /dev/console) 2>/dev/null; then exec </dev/console >/dev/console 2>&1; fi
cmd=""
root=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        kvmpy.cmd=*) cmd="${word#kvmpy.cmd=}" ;;
        kvmpy.root=*) root="${word#kvmpy.root=}" ;;
    esac
done
# kvmpy.root=DEVICE: a distribution on that disk takes over (its init runs kvmpy.cmd).
if [ -n "$root" ]; then
    for _ in 1 2 3 4 5; do [ -b "$root" ] && break; sleep 1; done
    mkdir -p /newroot
    if mount -t ext4 "$root" /newroot; then
        for fs in dev proc sys; do mount --move "/$fs" "/newroot/$fs"; done
        exec switch_root /newroot /sbin/init
    fi
    echo "kvmpy-init: cannot mount $root; powering off"
    poweroff -f
fi
echo "kvmpy-init: ready"
# Ctrl-Alt-Del reaches init as SIGINT (the kernel's default, kernel.ctrl-alt-del = 0): this init
# powers off. The command runs in the background so that the trap runs while init waits
# (with the console as its input: a background job's would be /dev/null).
trap 'echo "kvmpy-init: ctrl-alt-del"; poweroff -f' INT
if [ -n "$cmd" ]; then
    exec 3<&0
    sh -c "$(echo "$cmd" | base64 -d)" <&3 &
    wait $!
    echo "kvmpy-init: command exited $?"
    poweroff -f
fi
exec setsid cttyhack sh
"""


@dataclass(frozen=True, slots=True)
class GuestImage:
    kernel: Path
    #: The uncompressed ELF for the PVH route; None when the payload's compression
    #: (LZ4 in Debian's cloud kernels, for one) is not one Python can undo.
    vmlinux: Path | None
    initrd: Path


def encode_command(command: str) -> str:
    """The kernel command line word that makes the image's init run ``command``."""
    return "kvmpy.cmd=" + base64.b64encode(command.encode()).decode()


def extract_vmlinux(vmlinuz: Path) -> bytes:
    """The ELF kernel inside a bzImage (xz or gzip payload)."""
    data = vmlinuz.read_bytes()
    for magic, decompressor in ((b"\xfd7zXZ\x00", lambda: lzma.LZMADecompressor(lzma.FORMAT_XZ)),):
        start = data.find(magic)
        if start >= 0:
            elf = decompressor().decompress(data[start:])
            if elf[:4] == b"\x7fELF":
                return elf
    import zlib

    start = data.find(b"\x1f\x8b\x08")
    while start >= 0:
        try:
            elf = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[start:])
        except zlib.error:
            elf = b""
        if elf[:4] == b"\x7fELF":
            return elf
        start = data.find(b"\x1f\x8b\x08", start + 1)
    raise LabError(f"cannot find an xz or gzip payload holding vmlinux in {vmlinuz}")


def _available(tree: KernelTree, modules: list[str]) -> list[str]:
    usable = []
    for name in modules:
        try:
            load_order(tree, [name])
        except LabError:
            continue
        usable.append(name)
    return usable


def build_image(
    out: Path | None = None, kernel_package: str = DEFAULT_KERNEL_PACKAGE, modules: list[str] | None = None
) -> GuestImage:
    """Build (or reuse) the image for ``kernel_package`` with ``modules``."""
    package = resolve_kernel_package(kernel_package)
    kernel_root = fetch_package(package)
    busybox_root = fetch_package(BUSYBOX_PACKAGE)
    tree = KernelTree.find(kernel_root)
    wanted = _available(tree, modules if modules is not None else DEFAULT_MODULES)
    key = hashlib.sha256(
        "\0".join([package_version(kernel_root), package_version(busybox_root), GUEST_INIT, *wanted]).encode()
    ).hexdigest()[:16]
    directory = out or cache_dir() / "images" / f"{package}-{key}"
    directory.mkdir(parents=True, exist_ok=True)
    kernel, initrd = directory / tree.vmlinuz.name, directory / "initrd.cpio.gz"
    vmlinux: Path | None = directory / f"vmlinux-{tree.version}"
    if not kernel.exists():
        shutil.copyfile(tree.vmlinuz, kernel)
    if vmlinux is not None and not vmlinux.exists():
        try:
            vmlinux.write_bytes(extract_vmlinux(tree.vmlinuz))
        except LabError:
            vmlinux = None
    if not initrd.exists():
        with progress.step(f"building the guest initramfs ({len(wanted)} modules)"):
            initrd.write_bytes(build_initramfs(busybox_root, tree, wanted, GUEST_INIT))
    image = GuestImage(kernel, vmlinux, initrd)
    return image


def default_image() -> tuple[Path, Path]:
    """The kernel and initrd ``kvmpy run`` boots when none is given."""
    image = build_image()
    return image.kernel, image.initrd


__all__ = ["READY_MARKER", "GuestImage", "build_image", "default_image", "encode_command", "extract_vmlinux"]
