"""``kvmpy lab run`` and ``kvmpy image build``: the lab's command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from kvmpy.errors import ConfigError


def _size_mib(text: str) -> int:
    from kvmpy.vmm.config import parse_size

    return parse_size(text, what="--memory") >> 20


def _lab_run(args: argparse.Namespace) -> int:
    from kvmpy.lab.runner import run_in_lab

    command = list(args.lab_command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise ConfigError("kvmpy lab run needs a command after --")
    return run_in_lab(
        command,
        npt=args.npt == "on",
        cpus=args.cpus,
        memory_mib=_size_mib(args.memory),
        timeout=args.timeout,
        passthrough=args.passthrough,
        sriov=args.sriov,
    )


def _image_build(args: argparse.Namespace) -> int:
    from kvmpy.lab.image import build_image

    modules = args.modules.split(",") if args.modules else None
    image = build_image(out=args.out, kernel_package=args.kernel_package, modules=modules)
    vmlinux = image.vmlinux or "(not extracted: unsupported compression)"
    print(f"kernel: {image.kernel}\nvmlinux: {vmlinux}\ninitrd: {image.initrd}")
    return 0


def _image_distro(args: argparse.Namespace) -> int:
    from kvmpy.lab.distro import distro_boot

    boot = distro_boot(release=args.release, mirror=args.mirror, kernel_package=args.kernel_package)
    print(f"kernel: {boot.kernel}\ninitrd: {boot.initrd}\nimage: {boot.image}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    lab = subparsers.add_parser("lab", help="the nested lab: a machine with AMD SVM under QEMU TCG")
    lab_commands = lab.add_subparsers(dest="lab_action", required=True)
    run = lab_commands.add_parser("run", help="run a command inside the lab")
    run.add_argument("--npt", choices=["on", "off"], default="on", help="nested paging (off: shadow paging)")
    run.add_argument("--cpus", type=int, default=2)
    run.add_argument("--memory", default="3G")
    run.add_argument("--timeout", type=float, default=None, help="seconds before the lab is stopped")
    run.add_argument(
        "--passthrough",
        action="store_true",
        help="q35 with an Intel IOMMU and an NVMe controller bound to vfio-pci ($KVMPY_LAB_NVME)",
    )
    run.add_argument(
        "--sriov",
        action="store_true",
        help="q35 with an Intel IOMMU and two NVMe virtual functions on vfio-pci ($KVMPY_LAB_VF1, _VF2)",
    )
    run.add_argument("lab_command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    run.set_defaults(handler=_lab_run)

    image = subparsers.add_parser("image", help="guest images built from Debian packages")
    image_commands = image.add_subparsers(dest="image_action", required=True)
    build = image_commands.add_parser("build", help="build a kernel and busybox initramfs")
    build.add_argument("--out", type=Path, default=None)
    build.add_argument("--kernel-package", default="linux-image-amd64")
    build.add_argument("--modules", default=None, help="comma-separated kernel modules for the initramfs")
    build.set_defaults(handler=_image_build)
    distro = image_commands.add_parser("distro", help="build a Debian root file system image (needs root)")
    distro.add_argument("--release", default="bookworm")
    distro.add_argument("--mirror", default="http://deb.debian.org/debian")
    distro.add_argument("--kernel-package", default="linux-image-amd64", help="whose modules udev loads")
    distro.set_defaults(handler=_image_distro)


__all__ = ["register"]
