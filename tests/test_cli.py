"""The command line turns bad input into one line and a non-zero status (no KVM needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.cli import main
from kvmpy.kvm.errors import KvmUnavailableError

ROOT = Path(__file__).resolve().parents[1]


def test_missing_kernel_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--kernel", "/nonexistent/vmlinux"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["kvmpy: error: kernel /nonexistent/vmlinux does not exist"]


def test_bad_memory_size(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(b"\x7fELF" + bytes(60))
    assert main(["run", "--kernel", str(kernel), "--memory", "12Q"]) == 2
    assert "invalid --memory" in capsys.readouterr().err


def test_unknown_option_is_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "run", "--frobnicate"],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr


def test_no_kvm_device_is_a_clear_error() -> None:
    from kvmpy.kvm import System

    with pytest.raises(KvmUnavailableError, match="does not exist"):
        System("/nonexistent/kvm")
