"""A Debian root file system for the lab's second level: systemd, udev, a real userspace.

The busybox initramfs the other scenarios boot runs one shell command as PID 1; a
distribution does far more to its devices at boot (udev, systemd's parallel start-up,
journald writing to the root disk) and that is where a virtio defect showed that busybox
never hit (issue 13). This module builds that distribution with debootstrap (minbase
plus what a scenario needs), adds one systemd unit that runs the scenario's command
from the kernel command line once the multi-user target is reached, and packs the tree
into an ext4 image file (``mkfs.ext4 -d``: no loop mount). The image is cached under a
digest of its inputs, like the lab's other assets.

The guest boots it as Debian boots: an initramfs (kvmpy's busybox one, with only the
modules the root disk needs) mounts the root and ``switch_root``s into systemd
(``kvmpy.root=/dev/vda`` on the kernel command line: see ``kvmpy.lab.image``), and udev
loads the drivers of the other devices (virtio-net among them) from the image's
/lib/modules while systemd starts everything else, on every vCPU at once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvmpy.lab import LabError, progress
from kvmpy.lab.debian import cache_dir, fetch_package, package_version, resolve_kernel_package
from kvmpy.lab.image import DEFAULT_KERNEL_PACKAGE, READY_MARKER, build_image
from kvmpy.lab.modules import KernelTree, load_order

DEFAULT_RELEASE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: On top of debootstrap's minbase: an init system and device manager, and the tools the
#: network scenarios use (ping, ip, nc). Nothing else: every package is boot time in the lab.
PACKAGES = ("systemd", "systemd-sysv", "udev", "kmod", "iproute2", "iputils-ping", "netcat-openbsd")
#: What the initramfs loads: enough to mount the root disk, as Debian's own initramfs does.
ROOT_MODULES = ("virtio_pci", "virtio_blk", "crc32c_generic", "ext4")
#: Drivers udev loads from the root disk's /lib/modules when it sees the devices (with their
#: dependencies; depmod, run at build time, writes the indexes udev looks them up in).
UDEV_MODULES = ("virtio_net", "virtio_console", "virtio_rng", "pvpanic_mmio")
#: What a scenario needs on the kernel command line to boot this image as its root disk
#: (``net.ifnames=0`` keeps the interface named eth0 instead of udev's enp0sN).
ROOT_ARGS = "kvmpy.root=/dev/vda net.ifnames=0"
#: Space added beyond the tree, for the journal and a scenario's own files (ext4's own
#: metadata takes part of it: about 176 MiB are free in the bookworm image).
FREE_SPACE_MIB = 256
#: 4 KiB blocks as a distribution installer makes them (mke2fs would pick 1 KiB for an image
#: this small).
MKFS_OPTIONS = ("-b", "4096", "-L", "kvmpy-root")
#: Directories a booted test system never reads; dropped to keep the image (and the copy the
#: lab makes of it for every boot) small.
TRIMMED = (
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)

COMMAND_RUNNER = f"""#!/bin/sh
# kvmpy: run the scenario's command (kvmpy.cmd=BASE64 on the kernel command line) once
# systemd has reached multi-user.target, then power off cleanly. Without one, a shell.
cmd=""
for word in $(cat /proc/cmdline); do
    case "$word" in kvmpy.cmd=*) cmd="${{word#kvmpy.cmd=}}" ;; esac
done
echo "{READY_MARKER}"
if [ -n "$cmd" ]; then
    sh -c "$(echo "$cmd" | base64 -d)"
    echo "kvmpy-init: command exited $?"
else
    sh -i
fi
# What "systemctl poweroff" asks of systemd, without first asking logind (no D-Bus here).
exec systemctl start --no-block --job-mode=replace-irreversibly poweroff.target
"""

COMMAND_UNIT = """[Unit]
Description=kvmpy scenario command (kvmpy.cmd= on the kernel command line)
# Wanted by multi-user.target and ordered after it: it starts once the system is up.
After=multi-user.target

[Service]
# idle: starts when the boot's other jobs are dispatched, so its lines are not interleaved
# with systemd's status output on the console.
Type=idle
ExecStart=/usr/local/sbin/kvmpy-command
StandardInput=tty
StandardOutput=tty
StandardError=tty
TTYPath=/dev/console

[Install]
WantedBy=multi-user.target
"""

#: Files written into the tree: path, content, mode.
FILES: tuple[tuple[str, str, int], ...] = (
    ("usr/local/sbin/kvmpy-command", COMMAND_RUNNER, 0o755),
    ("etc/systemd/system/kvmpy-command.service", COMMAND_UNIT, 0o644),
    ("etc/hostname", "kvmpy-guest\n", 0o644),
    ("etc/fstab", "/dev/vda / ext4 defaults 0 0\n", 0o644),
)
#: Symbolic links: path, target. The unit is enabled; the gettys are masked because the
#: console carries the command's output, which the lab reads line by line (getty-static
#: starts gettys on tty2-6 where there is no D-Bus, and fails once they are masked).
LINKS: tuple[tuple[str, str], ...] = (
    ("etc/systemd/system/multi-user.target.wants/kvmpy-command.service", "../kvmpy-command.service"),
    ("etc/systemd/system/getty@.service", "/dev/null"),
    ("etc/systemd/system/serial-getty@.service", "/dev/null"),
    ("etc/systemd/system/getty-static.service", "/dev/null"),
)


@dataclass(frozen=True, slots=True)
class DistroBoot:
    """What a guest boots the distribution with: kernel, root-disk initramfs, root image."""

    kernel: Path
    initrd: Path
    image: Path


def distro_boot(
    release: str = DEFAULT_RELEASE, mirror: str = DEFAULT_MIRROR, kernel_package: str = DEFAULT_KERNEL_PACKAGE
) -> DistroBoot:
    """The kernel, an initramfs with :data:`ROOT_MODULES` only, and the image with that kernel's modules."""
    package = resolve_kernel_package(kernel_package)
    kernel_root = fetch_package(package)
    guest = build_image(kernel_package=package, modules=list(ROOT_MODULES))
    return DistroBoot(guest.kernel, guest.initrd, distro_image(release, mirror, kernel_root))


def image_key(release: str = DEFAULT_RELEASE, kernel: str = "") -> str:
    """A digest of everything that goes into the image (the mirror does not: same packages)."""
    parts = [release, kernel, *PACKAGES, *UDEV_MODULES, *TRIMMED, *MKFS_OPTIONS, str(FREE_SPACE_MIB)]
    parts += [f"{path}:{mode:o}:{content}" for path, content, mode in FILES]
    parts += [f"{path}->{target}" for path, target in LINKS]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def distro_image(release: str, mirror: str, kernel_root: Path) -> Path:
    """The ext4 image of Debian ``release`` with the unpacked kernel package's
    :data:`UDEV_MODULES`, built on first use and cached."""
    key = image_key(release, package_version(kernel_root))
    image = cache_dir() / "distro" / f"debian-{release}-{key}.ext4"
    if image.exists():
        return image
    _check_tools()
    image.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=image.parent) as work:
        root = Path(work) / "root"
        with progress.step(f"debootstrap of Debian {release} from {mirror} (minutes)"):
            debootstrap(release, mirror, root)
        configure(root)
        install_modules(root, KernelTree.find(kernel_root), list(UDEV_MODULES))
        partial = Path(work) / "image.ext4"
        with progress.step("making its ext4 image"):
            make_ext4(root, partial)
        partial.rename(image)
    return image


def _check_tools() -> None:
    if shutil.which("debootstrap") is None:
        raise LabError("building the Debian image: debootstrap is not installed (run scripts/setup)")
    if os.geteuid() != 0:
        raise LabError("building the Debian image: debootstrap needs root (run as root or with sudo)")


def debootstrap(release: str, mirror: str, root: Path) -> None:
    """A minbase ``release`` with :data:`PACKAGES` in ``root``; one line naming the cause on failure."""
    packages = ",".join(PACKAGES)
    command = ["debootstrap", "--variant=minbase", f"--include={packages}", release, str(root), mirror]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr + done.stdout).strip().splitlines()
        errors = [line for line in lines if line.startswith("E:")]
        reason = (errors or lines or [f"exit {done.returncode}"])[-1]
        raise LabError(f"debootstrap {release} from {mirror} failed: {reason}")


def configure(root: Path) -> None:
    """The kvmpy command unit, host name and fstab; trimmed of what a test boot never reads."""
    for relative, content, mode in FILES:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
        path.chmod(mode)
    for relative, target in LINKS:
        link = root / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    for relative in TRIMMED:
        shutil.rmtree(root / relative, ignore_errors=True)
        (root / relative).mkdir(parents=True)


def install_modules(root: Path, tree: KernelTree, names: list[str]) -> None:
    """``names`` and their dependencies under the root's /lib/modules, indexed by depmod."""
    target = root / "lib" / "modules" / tree.version
    for _name, path in load_order(tree, names):
        destination = target / path.relative_to(tree.modules_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, destination)
    for listing in tree.modules_dir.glob("modules.*"):  # builtin, builtin.modinfo, order
        shutil.copyfile(listing, target / listing.name)
    done = subprocess.run(["chroot", str(root), "depmod", tree.version], capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit {done.returncode}"]
        raise LabError(f"depmod in the Debian image failed: {lines[-1]}")


def make_ext4(root: Path, image: Path) -> None:
    """An ext4 file system holding ``root``, sized to it plus :data:`FREE_SPACE_MIB` (sparse)."""
    used = subprocess.run(["du", "-s", "-B1M", str(root)], capture_output=True, text=True, check=True)
    size_mib = int(used.stdout.split()[0]) * 5 // 4 + FREE_SPACE_MIB  # a quarter more for metadata
    command = ["mkfs.ext4", "-q", "-F", *MKFS_OPTIONS, "-d", str(root), str(image), f"{size_mib}M"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or [f"exit {done.returncode}"]
        raise LabError(f"making the Debian image's ext4 file system failed: {lines[-1]}")


__all__ = [
    "DEFAULT_MIRROR",
    "DEFAULT_RELEASE",
    "PACKAGES",
    "ROOT_ARGS",
    "ROOT_MODULES",
    "UDEV_MODULES",
    "DistroBoot",
    "distro_boot",
    "distro_image",
    "image_key",
]
