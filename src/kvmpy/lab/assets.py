"""The lab's first-level kernel and initramfs, built once and cached by their inputs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from kvmpy.lab import progress
from kvmpy.lab.debian import cache_dir, fetch_package, package_version, resolve_kernel_package
from kvmpy.lab.initramfs import build_initramfs
from kvmpy.lab.modules import KernelTree

LAB_KERNEL_PACKAGE = "linux-image-amd64"
BUSYBOX_PACKAGE = "busybox-static"
#: What the lab kernel needs: virtio PCI, 9p over virtio, KVM for AMD SVM, tun and vhost-net for networking,
#: and ext4 on a loop device for O_DIRECT scratch space (its tmpfs has no O_DIRECT; ext4
#: wants the crc32c algorithm at mount time, which nothing in the lab would load on demand).
LAB_MODULES = [
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "kvm_amd",
    "tun",
    "vhost_net",  # virtio-net's rings in the lab's kernel (issue 15); brings vhost and tap
    "vhost_vsock",  # AF_VSOCK between the lab and its guests
    "loop",
    "crc32c_generic",
    "ext4",
]

#: The passthrough lab's extra modules (issue 16): VFIO for PCI devices, with the type-1 IOMMU
#: back end (its dependencies, vfio, vfio_pci_core and vfio_virqfd where separate, follow).
#: Its emulated NVMe controller gets no host driver: the nvme module is not in the initramfs.
VFIO_MODULES = ["vfio_iommu_type1", "vfio_pci"]
#: The SR-IOV lab's primary controller keeps a host driver: it hands out its functions' resources.
SRIOV_MODULES = ["nvme"]

LAB_INIT = r"""#!/bin/sh
# kvmpy lab, first level: load modules, mount the host's / over 9p, run the command there.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
fail() {
    echo "kvmpy-lab: FAILED: $*"
    echo "$*" > /share/lab-error 2>/dev/null
    poweroff -f
}
npt=1
for word in $(cat /proc/cmdline); do
    case "$word" in kvmpy.npt=*) npt="${word#kvmpy.npt=}" ;; esac
done
while read -r name file; do
    params=""
    [ "$name" = kvm_amd ] && params="npt=$npt"
    insmod "/modules/$file" $params || fail "loading module $name"
done < /modules.list
mkdir -p /share /host
opts=trans=virtio,version=9p2000.L,msize=512000
mount -t 9p -o $opts share /share || fail "mounting the lab share over 9p"
mount -t 9p -o $opts,ro hostroot /host || fail "mounting the host's / over 9p"
mount -t proc proc /host/proc || fail "mounting /proc in the chroot"
mount -t sysfs sysfs /host/sys || fail "mounting /sys in the chroot"
mount -t devtmpfs devtmpfs /host/dev || fail "mounting /dev in the chroot"
mkdir -p /host/dev/pts /host/dev/shm
mount -t devpts devpts /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
# The host's /tmp stays visible (read-only: checkouts may live there); writable
# scratch space is a tmpfs on /run, which the command gets as TMPDIR.
mount -t tmpfs tmpfs /host/run || fail "mounting /run in the chroot"
mkdir -p /host/run/tmp /host/run/kvmpy-lab-share
chmod 1777 /host/run/tmp
mount --bind /share /host/run/kvmpy-lab-share || fail "binding the share into the chroot"
[ -e /dev/kvm ] || fail "/dev/kvm is missing after loading kvm_amd (no SVM?)"
echo "kvmpy-lab: ready (npt=$npt)"
chroot /host /bin/sh /run/kvmpy-lab-share/command.sh > /share/output 2>&1 < /dev/null
echo $? > /share/status
sync
poweroff -f
"""


@dataclass(frozen=True, slots=True)
class LabAssets:
    kernel: Path
    initrd: Path


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def lab_assets(
    kernel_package: str = LAB_KERNEL_PACKAGE, *, passthrough: bool = False, sriov: bool = False
) -> LabAssets:
    """The first-level kernel and initramfs, rebuilt when any input changes (``passthrough``:
    with the VFIO modules, for the lab with an IOMMU; ``sriov``: and the nvme driver, which
    the SR-IOV lab's primary controller keeps)."""
    modules = LAB_MODULES + VFIO_MODULES if passthrough else LAB_MODULES
    if sriov:
        modules = [*modules, *SRIOV_MODULES]
    package = resolve_kernel_package(kernel_package)
    kernel_root = fetch_package(package)
    busybox_root = fetch_package(BUSYBOX_PACKAGE)
    tree = KernelTree.find(kernel_root)
    key = _digest(package_version(kernel_root), package_version(busybox_root), LAB_INIT, *modules)
    initrd = cache_dir() / "lab" / f"lab-initrd-{key}.cpio.gz"
    if not initrd.exists():
        initrd.parent.mkdir(parents=True, exist_ok=True)
        with progress.step("building the lab's initramfs"):
            data = build_initramfs(busybox_root, tree, modules, LAB_INIT)
        partial = initrd.with_suffix(".partial")
        partial.write_bytes(data)
        partial.rename(initrd)
    return LabAssets(tree.vmlinuz, initrd)


__all__ = ["LAB_INIT", "LAB_MODULES", "SRIOV_MODULES", "VFIO_MODULES", "LabAssets", "lab_assets"]
