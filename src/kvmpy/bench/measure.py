"""Running one VMM process and measuring it: wall time, time to first output, CPU, memory."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

QEMU = "qemu-system-x86_64"
#: QEMU's microvm machine boots a PVH kernel without firmware, as kvmpy does; QEMU's default
#: PC machine first runs SeaBIOS, which this host (PVM) emulates slowly.
QEMU_MACHINE = "microvm,x-option-roms=off"
QEMU_CPU = "host,-arch-capabilities"  # PVM refuses the ARCH_CAPABILITIES MSR QEMU sets for -cpu host
#: "kvmpy-jailed": kvmpy run --jail (seccomp, Landlock, namespaces, uid 4242), the guest bound in.
JAILED = "kvmpy-jailed"
JAIL_BASE = Path("/tmp/kvmpy-bench-jails")


@dataclass(frozen=True, slots=True)
class Sample:
    vmm: str
    wall: float
    first_output: float | None
    cpu: float  # user + system seconds of the VMM process
    max_rss: int  # bytes
    status: int
    output: bytes


def command(
    vmm: str, guest: Path, cmdline: str, memory_mib: int = 256, extra: tuple[str, ...] = ()
) -> list[str]:
    if vmm == "qemu":
        return [
            QEMU, "-enable-kvm", "-M", QEMU_MACHINE, "-cpu", QEMU_CPU, "-m", str(memory_mib),
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot",
            "-kernel", str(guest), "-append", cmdline, "-device", "isa-debug-exit,iobase=0x501,iosize=2",
        ]  # fmt: skip
    jail = ["--jail", "--jail-uid", "4242", "--jail-gid", "4242", "--chroot-base-dir", str(JAIL_BASE),
            "--id", "bench"] if vmm == JAILED else []  # fmt: skip
    return [sys.executable, "-m", "kvmpy", "run", *jail, "--kernel", str(guest), "--cmdline", cmdline,
            "--memory", f"{memory_mib}M", *extra]  # fmt: skip


def exit_status(vmm: str, raw: int) -> int:
    """The guest's debug-exit code (QEMU reports (code << 1) | 1)."""
    return raw >> 1 if vmm == "qemu" and raw & 1 else raw


def run(vmm: str, guest: Path, cmdline: str, memory_mib: int = 256, extra: tuple[str, ...] = ()) -> Sample:
    """Run ``guest`` under ``vmm`` to its end; ``extra``: more of kvmpy's options."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    started = time.perf_counter()
    process = subprocess.Popen(
        command(vmm, guest, cmdline, memory_mib, extra),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    first: list[float] = []
    chunks: list[bytes] = []

    def reader() -> None:
        assert process.stdout is not None
        while chunk := process.stdout.read1(65536):  # type: ignore[attr-defined]
            if not first:
                first.append(time.perf_counter() - started)
            chunks.append(chunk)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    _, raw_status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    thread.join(5)
    process.returncode = os.waitstatus_to_exitcode(raw_status)
    return Sample(
        vmm=vmm,
        wall=wall,
        first_output=first[0] if first else None,
        cpu=usage.ru_utime + usage.ru_stime,
        max_rss=usage.ru_maxrss * 1024,
        status=exit_status(vmm, process.returncode),
        output=b"".join(chunks),
    )


__all__ = ["JAILED", "QEMU", "Sample", "command", "run"]
