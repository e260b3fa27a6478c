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
#: Run first in the passthrough lab: every NVMe controller to vfio-pci (vfio.rst's recipe).
BIND_NVME_TO_VFIO = r"""for dev in /sys/bus/pci/devices/*; do
    [ "$(cat "$dev/class")" = 0x010802 ] || continue
    echo vfio-pci > "$dev/driver_override"
    [ -e "$dev/driver" ] && echo "${dev##*/}" > "$dev/driver/unbind"
    echo "${dev##*/}" > /sys/bus/pci/drivers_probe
done"""


def command_script(
    command: Sequence[str], cwd: Path, env: Mapping[str, str], *, passthrough: bool = False
) -> str:
    """The shell script the lab runs in the chroot: environment, directory, command (after
    binding the NVMe controller to vfio-pci in the passthrough lab)."""
    lines = ["#!/bin/sh"]
    if passthrough:
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
) -> list[str]:
    """The lab's QEMU; with ``nvme_disk``, the passthrough lab (issue 16): q35 with an
    emulated Intel IOMMU, which must come before every other PCI device, the kernel told to
    use it (``iommu=pt``: the lab's own devices bypass it), and an NVMe controller on that disk."""
    virtfs = "security_model=none,multidevs=remap"
    iommu = ["-device", "intel-iommu"] if nvme_disk is not None else []
    append = " intel_iommu=on iommu=pt" if nvme_disk is not None else ""
    nvme = []
    if nvme_disk is not None:
        nvme = [
            "-drive", f"file={nvme_disk},if=none,id=nv0,format=raw",
            "-device", f"nvme,serial={NVME_SERIAL},drive=nv0,addr=0x{int(NVME_ADDRESS[8:10], 16):x}",
        ]  # fmt: skip
    return [
        QEMU,
        "-accel", "tcg,thread=multi",
        "-M", "q35" if nvme_disk is not None else "pc",
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
) -> int:
    """Run ``command`` in the lab and return its exit status; its output goes to ``output``.

    With ``stall_seconds``, a command that prints nothing for that long counts as a hung lab
    (:class:`LabStalledError`): for commands that print a heartbeat, as scenario batches do.
    ``passthrough``: the lab with an IOMMU and an NVMe controller bound to vfio-pci, whose
    address the command finds in ``KVMPY_LAB_NVME``.
    """
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} is not installed (run scripts/setup)")
    if not command:
        raise LabError("no command given to run in the lab")
    assets = lab_assets(passthrough=passthrough)
    compile_package()  # the lab mounts this checkout read-only: its kvmpy runs from these .pyc files
    sink = output if output is not None else sys.stdout.buffer
    environment = {
        k: v for k, v in (env if env is not None else os.environ).items() if k in PASSED_ENVIRONMENT
    }
    with tempfile.TemporaryDirectory(prefix="kvmpy-lab-") as temporary:
        share = Path(temporary)
        script = command_script(command, cwd or Path.cwd(), environment, passthrough=passthrough)
        (share / "command.sh").write_text(script)
        disk = None
        if passthrough:
            disk = share / "nvme.img"
            with disk.open("wb") as handle:
                handle.truncate(NVME_DISK_SIZE)
        qemu = subprocess.Popen(
            qemu_command(
                assets.kernel, assets.initrd, share, npt=npt, cpus=cpus, memory_mib=memory_mib, nvme_disk=disk
            ),
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
