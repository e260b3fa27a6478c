"""``kvmpy ctl`` against a real ``kvmpy run --api-sock`` with the counter guest: end to end."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvmpy.cli import main
from kvmpy.testing.process import start_kvmpy

pytestmark = pytest.mark.kvm

BANNER = b"kvmpy counter guest: the banner a monitor can find\0"


@dataclass
class LiveVmm:
    process: subprocess.Popen[str]
    socket: str
    console: Path
    banner: int

    def ticks(self) -> int:
        return self.console.read_text(errors="replace").count("tick ")


def _wait(condition: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def vmm(guests: Path, tmp_path: Path) -> Iterator[LiveVmm]:
    socket_path, console = str(tmp_path / "api.sock"), tmp_path / "console.txt"
    process = start_kvmpy(
        "run",
        "--kernel",
        str(guests / "counter.elf"),
        "--cmdline",
        "gap=20000000",
        "--serial",
        f"file:{console}",
        "--api-sock",
        socket_path,
    )
    try:
        _wait(lambda: console.exists() and "tick 2" in console.read_text(), "the guest's second tick")
        match = re.search(r"banner at (0x[0-9a-f]+)", console.read_text())
        assert match is not None
        yield LiveVmm(process, socket_path, console, int(match.group(1), 16))
    finally:
        if process.poll() is None:
            process.terminate()
        process.communicate(timeout=15)


def ctl(capsys: pytest.CaptureFixture[str], socket_path: str, *command: str) -> Any:
    """``kvmpy ctl SOCKET --json COMMAND``: its decoded output (the test fails on an error)."""
    status = main(["ctl", socket_path, "--json", *command])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return json.loads(captured.out) if captured.out.strip().startswith(("{", "[")) else captured.out


def test_translate_and_x_find_the_banner_on_the_live_guest(
    vmm: LiveVmm, capsys: pytest.CaptureFixture[str]
) -> None:
    walk = ctl(capsys, vmm.socket, "translate", f"{vmm.banner:#x}")
    assert walk["agrees_with_kvm"] is True and walk["walk"]["mode"] == "4-level"
    memory = ctl(capsys, vmm.socket, "x", f"{walk['gpa']:#x}", str(len(BANNER)), "--physical")
    assert bytes.fromhex(memory["data"]) == BANNER
    assert main(["ctl", vmm.socket, "x", f"{vmm.banner:#x}", "16"]) == 0
    assert "|kvmpy counter gu|" in capsys.readouterr().out


def test_pause_resume_stats_and_quit(vmm: LiveVmm, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ctl", vmm.socket, "pause"]) == 0
    assert capsys.readouterr().out.endswith("state Paused\n")
    ticks = vmm.ticks()
    paused = ctl(capsys, vmm.socket, "vcpus")
    assert paused["vcpus"][0]["state"] == "paused"
    time.sleep(0.5)  # about 50 ticks' worth of guest time
    assert vmm.ticks() == ticks
    assert (
        ctl(capsys, vmm.socket, "vcpus")["vcpus"][0]["guest_seconds"] == paused["vcpus"][0]["guest_seconds"]
    )
    assert main(["ctl", vmm.socket, "resume"]) == 0
    assert capsys.readouterr().out.endswith("state Running\n")
    _wait(lambda: vmm.ticks() > ticks + 2, "ticks after the resume")
    first = ctl(capsys, vmm.socket, "stats")
    _wait(lambda: vmm.ticks() > ticks + 6, "more ticks")
    second = ctl(capsys, vmm.socket, "stats")
    assert second["total_exits"] > first["total_exits"]
    assert main(["ctl", vmm.socket, "quit"]) == 0
    vmm.process.wait(timeout=15)
    assert main(["ctl", vmm.socket, "status"]) == 1
    assert "kvmpy: error:" in capsys.readouterr().err
