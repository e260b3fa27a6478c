"""The test guests also boot under QEMU (TCG), so benchmarks compare like with like."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kvmpy.testing.guests import build_guests

QEMU = "qemu-system-x86_64"


@pytest.fixture(scope="module")
def guests() -> Path:
    if shutil.which(QEMU) is None:
        pytest.skip(f"{QEMU} is not installed (run scripts/setup)")
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    return build_guests()


def qemu(guest: Path, cmdline: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            QEMU,
            "-M",
            "pc",
            "-cpu",
            "max",
            "-m",
            "256",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
            "-kernel",
            str(guest),
            "-append",
            cmdline,
            "-device",
            "isa-debug-exit,iobase=0x501,iosize=2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("name", "cmdline", "status", "expected"),
    [
        ("hello", "exit=3 from qemu", 3, "command line: exit=3 from qemu"),
        ("pio_storm", "count=200", 0, "pio_storm done 200"),
        ("mmio_storm", "count=200", 0, "mmio_storm done 200"),
        ("memtouch", "mib=8", 0, "memtouch ok 8 MiB"),
        ("hlt", "count=3", 0, "hlt woke 3 times"),
        ("badio", "", 0, "mmio 0xd0001000 read"),
    ],
)
def test_guest_under_qemu(guests: Path, name: str, cmdline: str, status: int, expected: str) -> None:
    done = qemu(guests / f"{name}.elf", cmdline)
    assert done.returncode == (status << 1) | 1, done.stdout + done.stderr
    assert expected in done.stdout


def test_fault_guest_resets_qemu(guests: Path) -> None:
    done = qemu(guests / "fault.elf", "")
    assert "about to triple fault" in done.stdout
    assert done.returncode == 0  # -no-reboot: the triple fault ends QEMU without debug-exit


def test_nvme_identify_drives_qemus_nvme_controller(guests: Path, tmp_path: Path) -> None:
    """The lab's assigned-NVMe guest against QEMU's controller directly (no VFIO): the
    Identify command's answer comes back by DMA."""
    disk = tmp_path / "nvme.img"
    disk.write_bytes(b"")
    with disk.open("r+b") as handle:
        handle.truncate(16 << 20)
    nvme = [f"file={disk},if=none,id=nv0,format=raw", "nvme,serial=kvmpy0,drive=nv0"]
    done = subprocess.run(
        [QEMU, "-M", "pc", "-cpu", "max", "-m", "256", "-display", "none", "-monitor", "none",
         "-serial", "stdio", "-no-reboot", "-kernel", str(guests / "nvme_identify.elf"),
         "-device", "isa-debug-exit,iobase=0x501,iosize=2", "-drive", nvme[0], "-device", nvme[1]],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr  # exit 0 as QEMU reports it
    assert "nvme_identify: serial kvmpy0\n" in done.stdout
    assert "nvme_identify: model QEMU NVMe Ctrl\n" in done.stdout
