"""Run a command inside the lab: boot QEMU/TCG with SVM, stream the output, return the status."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

from kvmpy.bytecode import compile_package
from kvmpy.lab import LabError
from kvmpy.lab.assets import lab_assets
from kvmpy.lab.debian import cache_dir

QEMU = "qemu-system-x86_64"
#: Environment variables carried from the caller into the lab command.
PASSED_ENVIRONMENT = ("PATH", "PYTHONPATH", "HOME", "LANG", "LC_ALL", "VIRTUAL_ENV", "TERM", "CI")
SHARE_IN_LAB = "/run/kvmpy-lab-share"
SCRATCH_IN_LAB = "/run/tmp"
POLL_SECONDS = 0.2
#: The passthrough lab's NVMe controller: where it sits on the lab's bus 0, its serial, its disk.
NVME_ADDRESS = "0000:00:10.0"
NVME_SERIAL = "kvmpy0"
NVME_DISK_SIZE = 64 << 20
#: The SR-IOV lab's e1000e NIC, bound to vfio-pci too.
NIC_ADDRESS = "0000:00:11.0"
#: Run first in the passthrough lab: every NVMe controller to vfio-pci (vfio.rst's recipe).
BIND_NVME_TO_VFIO = r"""for dev in /sys/bus/pci/devices/*; do
    [ "$(cat "$dev/class")" = 0x010802 ] || continue
    echo vfio-pci > "$dev/driver_override"
    [ -e "$dev/driver" ] && echo "${dev##*/}" > "$dev/driver/unbind"
    echo "${dev##*/}" > /sys/bus/pci/drivers_probe
done"""


#: The SR-IOV lab (issue 16): the controller keeps the lab's nvme driver, whose admin queue gives
#: the virtual functions their queues and interrupts (QEMU's docs/system/devices/nvme.rst), and
#: each virtual function gets a private namespace of its own size, so a guest's disk size says
#: which slice it was given.
SRIOV_NAMESPACE_SIZES = (32 << 20, 48 << 20)
#: Run first in the SR-IOV lab: the primary controller's flexible resources released, the virtual
#: functions enabled, each given one interrupt and two queues (admin and one I/O), set online,
#: given its namespace, and bound to vfio-pci; their addresses land in KVMPY_LAB_VF1 and _VF2,
#: the e1000e's, also on vfio-pci, in KVMPY_LAB_NIC.
SRIOV_SETUP = r"""PATH=$PATH:/usr/sbin:/sbin  # nvme-cli
sriov_fail() { echo "kvmpy-lab: SR-IOV set-up failed: $*"; exit 125; }
pf=/sys/bus/pci/devices/{pf}
for _ in $(seq 100); do [ -c /dev/nvme0 ] && break; sleep 0.1; done
[ -c /dev/nvme0 ] || sriov_fail "no /dev/nvme0 (the primary controller has no nvme driver)"
nvme virt-mgmt /dev/nvme0 -c 0 -r 1 -a 1 -n 0 > /dev/null || sriov_fail "releasing the primary's interrupts"
nvme virt-mgmt /dev/nvme0 -c 0 -r 0 -a 1 -n 0 > /dev/null || sriov_fail "releasing the primary's queues"
echo 1 > $pf/reset || sriov_fail "resetting the primary controller"
echo 0 > $pf/sriov_drivers_autoprobe
echo {vfs} > $pf/sriov_numvfs || sriov_fail "enabling {vfs} virtual functions"
n=0
for link in $pf/virtfn*; do
    n=$((n + 1))
    vf=$(basename "$(readlink "$link")")
    nvme virt-mgmt /dev/nvme0 -c $n -r 1 -a 8 -n 1 > /dev/null || sriov_fail "an interrupt for $vf"
    nvme virt-mgmt /dev/nvme0 -c $n -r 0 -a 8 -n 2 > /dev/null || sriov_fail "queues for $vf"
    nvme virt-mgmt /dev/nvme0 -c $n -r 0 -a 9 -n 0 > /dev/null || sriov_fail "setting $vf online"
    nvme attach-ns /dev/nvme0 -n $n -c $n > /dev/null || sriov_fail "attaching namespace $n to $vf"
    echo vfio-pci > /sys/bus/pci/devices/$vf/driver_override
    echo $vf > /sys/bus/pci/drivers_probe
    export KVMPY_LAB_VF$n=$vf
done
[ $n = {vfs} ] || sriov_fail "$n virtual functions appeared, not {vfs}"
nic=/sys/bus/pci/devices/{nic}
echo vfio-pci > $nic/driver_override
[ -e $nic/driver ] && echo {nic} > $nic/driver/unbind
echo {nic} > /sys/bus/pci/drivers_probe
export KVMPY_LAB_NIC={nic}
"""


def command_script(
    command: Sequence[str],
    cwd: Path,
    env: Mapping[str, str],
    *,
    passthrough: bool = False,
    sriov: bool = False,
) -> str:
    """The shell script the lab runs in the chroot: environment, directory, command (after
    binding the NVMe controller to vfio-pci in the passthrough lab, or its virtual functions
    in the SR-IOV lab)."""
    lines = ["#!/bin/sh"]
    if sriov:
        vfs = str(len(SRIOV_NAMESPACE_SIZES))
        setup = SRIOV_SETUP.rstrip("\n").replace("{pf}", NVME_ADDRESS).replace("{nic}", NIC_ADDRESS)
        lines.append(setup.replace("{vfs}", vfs))
        lines.append(f"export KVMPY_LAB_NVME={NVME_ADDRESS}")
    elif passthrough:
        lines.append(BIND_NVME_TO_VFIO)
        lines.append(f"export KVMPY_LAB_NVME={NVME_ADDRESS}")
    for name, value in sorted(env.items()):
        lines.append(f"export {name}={shlex.quote(value)}")
    lines.append(f"export KVMPY_LAB_SHARE={SHARE_IN_LAB}")
    lines.append(f"export TMPDIR={SCRATCH_IN_LAB}")
    lines.append(f"cd {shlex.quote(str(cwd))} || exit 126")
    lines.append("exec " + " ".join(shlex.quote(arg) for arg in command))
    return "\n".join(lines) + "\n"


def qemu_command(
    kernel: Path,
    initrd: Path,
    share: Path,
    *,
    npt: bool,
    cpus: int,
    memory_mib: int,
    nvme_disk: Path | None = None,
    namespace_disks: Sequence[Path] = (),
) -> list[str]:
    """The lab's QEMU; with ``nvme_disk``, the passthrough lab (issue 16): q35 with an
    emulated Intel IOMMU, which must come before every other PCI device, the kernel told to
    use it (``iommu=pt``: the lab's own devices bypass it), and an NVMe controller on that disk.
    With ``namespace_disks`` instead, the SR-IOV lab: the controller in an NVM subsystem with
    one virtual function per disk, each disk a private namespace attached to no controller yet."""
    virtfs = "security_model=none,multidevs=remap"
    iommu = ["-device", "intel-iommu"] if nvme_disk is not None or namespace_disks else []
    append = " intel_iommu=on iommu=pt" if iommu else ""
    address = f"addr=0x{int(NVME_ADDRESS[8:10], 16):x}"
    nvme = []
    if nvme_disk is not None:
        nvme = [
            "-drive", f"file={nvme_disk},if=none,id=nv0,format=raw",
            "-device", f"nvme,serial={NVME_SERIAL},drive=nv0,{address}",
        ]  # fmt: skip
    elif namespace_disks:
        vfs = len(namespace_disks)
        # Each function gets an admin and an I/O queue and one interrupt; the primary keeps two
        # queues of its own (QEMU's minimum).
        sriov = f"sriov_max_vfs={vfs},sriov_vq_flexible={2 * vfs},sriov_vi_flexible={vfs}"
        sriov += f",max_ioqpairs={2 * vfs + 2}"
        nvme = ["-device", "nvme-subsys,id=kvmpy-subsys,nqn=kvmpy-sriov"]
        nvme += ["-device", f"nvme,serial={NVME_SERIAL},id=nvme0,subsys=kvmpy-subsys,{address},{sriov}"]
        for nsid, disk in enumerate(namespace_disks, 1):
            nvme += ["-drive", f"file={disk},if=none,id=ns{nsid},format=raw"]
            nvme += ["-device", f"nvme-ns,drive=ns{nsid},bus=nvme0,nsid={nsid},shared=off,detached=on"]
        # An e1000e on QEMU's user network: 10.0.2.2 is the gateway, and TCP to it reaches the
        # host's loopback, where a test can listen.
        nic_address = f"addr=0x{int(NIC_ADDRESS[8:10], 16):x}"
        nvme += ["-netdev", "user,id=lan,ipv6=off", "-device", f"e1000e,netdev=lan,{nic_address}"]
    return [
        QEMU,
        "-accel", "tcg,thread=multi",
        "-M", "q35" if iommu else "pc",
        *iommu,
        "-cpu", "max",
        "-smp", str(cpus),
        "-m", str(memory_mib),
        "-display", "none",
        "-monitor", "none",
        "-no-reboot",
        "-serial", f"file:{share / 'console.log'}",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        # No transparent huge pages in the lab: its khugepaged, collapsing a nested guest's
        # RAM under TCG, locked up a lab CPU for minutes and hung that guest (docs/lab.md).
        "-append", f"console=ttyS0 quiet panic=-1 transparent_hugepage=never kvmpy.npt={int(npt)}{append}",
        "-virtfs", f"local,path=/,mount_tag=hostroot,readonly=on,{virtfs}",
        "-virtfs", f"local,path={share},mount_tag=share,{virtfs}",
        *nvme,
    ]  # fmt: skip


class _OutputTail:
    """Copies new bytes of a growing file to ``sink``."""

    def __init__(self, path: Path, sink: BinaryIO) -> None:
        self._path = path
        self._sink = sink
        self._offset = 0

    def pump(self) -> int:
        """Copy what is new; returns how many bytes that was."""
        try:
            with self._path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return 0
        if data:
            self._offset += len(data)
            self._sink.write(data)
            self._sink.flush()
        return len(data)


def run_in_lab(
    command: Sequence[str],
    *,
    cwd: Path | None = None,
    npt: bool = True,
    cpus: int = 2,
    memory_mib: int = 3072,
    timeout: float | None = None,
    env: Mapping[str, str] | None = None,
    output: BinaryIO | None = None,
    stall_seconds: float | None = None,
    passthrough: bool = False,
    sriov: bool = False,
) -> int:
    """Run ``command`` in the lab and return its exit status; its output goes to ``output``.

    With ``stall_seconds``, a command that prints nothing for that long counts as a hung lab
    (:class:`LabStalledError`): for commands that print a heartbeat, as scenario batches do.
    ``passthrough``: the lab with an IOMMU and an NVMe controller bound to vfio-pci, whose
    address the command finds in ``KVMPY_LAB_NVME``. ``sriov``: the lab with an IOMMU and the
    NVMe controller's two virtual functions bound to vfio-pci (``KVMPY_LAB_VF1``, ``_VF2``),
    their namespaces' images in ``KVMPY_LAB_SHARE`` as ns1.img and ns2.img.
    """
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} is not installed (run scripts/setup)")
    if not command:
        raise LabError("no command given to run in the lab")
    assets = lab_assets(passthrough=passthrough or sriov, sriov=sriov)
    compile_package()  # the lab mounts this checkout read-only: its kvmpy runs from these .pyc files
    sink = output if output is not None else sys.stdout.buffer
    environment = {
        k: v for k, v in (env if env is not None else os.environ).items() if k in PASSED_ENVIRONMENT
    }
    with tempfile.TemporaryDirectory(prefix="kvmpy-lab-") as temporary:
        share = Path(temporary)
        script = command_script(command, cwd or Path.cwd(), environment, passthrough=passthrough, sriov=sriov)
        (share / "command.sh").write_text(script)
        disk = None
        namespaces: list[Path] = []
        if sriov:
            sizes = enumerate(SRIOV_NAMESPACE_SIZES, 1)
            namespaces = [_sparse(share / f"ns{n}.img", size) for n, size in sizes]
        elif passthrough:
            disk = _sparse(share / "nvme.img", NVME_DISK_SIZE)
        qemu = subprocess.Popen(
            qemu_command(
                assets.kernel, assets.initrd, share, npt=npt, cpus=cpus, memory_mib=memory_mib,
                nvme_disk=disk, namespace_disks=namespaces,
            ),  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        tail = _OutputTail(share / "output", sink)
        started = last_output = time.monotonic()
        try:
            while qemu.poll() is None:
                now = time.monotonic()
                if tail.pump():
                    last_output = now
                if timeout is not None and now - started > timeout:
                    raise LabError(f"the lab command did not finish within {timeout:.0f} s")
                if stall_seconds is not None and now - last_output > stall_seconds:
                    raise LabStalledError(
                        f"the lab printed nothing for {stall_seconds:.0f} s: hung\n{_console_tail(share)}"
                    )
                time.sleep(POLL_SECONDS)
        finally:
            if qemu.poll() is None:
                qemu.kill()
            qemu_output = qemu.communicate()[0].decode("utf-8", "replace") if qemu.stdout else ""
        tail.pump()
        return _status(share, qemu.returncode, qemu_output)


def _sparse(path: Path, size: int) -> Path:
    with path.open("wb") as handle:
        handle.truncate(size)
    return path


def _status(share: Path, qemu_status: int, qemu_output: str) -> int:
    error = share / "lab-error"
    console = share / "console.log"
    if console.exists():  # kept for post-mortems: the share itself is deleted
        shutil.copyfile(console, cache_dir() / "lab" / "last-console.log")
    log_tail = _console_tail(share)
    if error.exists():
        raise LabError(f"the lab failed while {error.read_text().strip()}\n{log_tail}")
    status = share / "status"
    if not status.exists():
        reason = qemu_output.strip().splitlines()[-1] if qemu_output.strip() else f"QEMU exit {qemu_status}"
        raise LabEndedError(f"the lab ended before the command finished ({reason})\n{log_tail}")
    return int(status.read_text().strip() or "1")


def _console_tail(share: Path) -> str:
    console = share / "console.log"
    if not console.exists():
        return ""
    lines = console.read_text("utf-8", "replace").splitlines()[-15:]
    return "\n".join(f"  | {line}" for line in lines)


class LabEndedError(LabError):
    """The lab machine itself went down (reset or crash) while the command ran."""


class LabStalledError(LabEndedError):
    """The lab stopped making progress (its kernel hung) while the command ran."""


__all__ = ["LabEndedError", "LabStalledError", "command_script", "qemu_command", "run_in_lab"]
