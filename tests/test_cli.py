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


def test_no_kernel_on_a_kvm_that_cannot_boot_linux_says_where_to_go(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, ``kvmpy run`` alone on PVM booted the default image, whose ring-0 code PVM
    emulates at about 1 MIPS, and sat silent."""
    from kvmpy.vmm import host

    monkeypatch.setattr(host, "kvm_runs_stock_kernels", lambda: False)
    assert main(["run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no VT-x/AMD-V (PVM)" in err[0] and "'kvmpy demo'" in err[0], err


def test_setup_probes_its_tools_without_a_traceback() -> None:
    """scripts/setup asks Python whether kvmpy and its tools are installed; on a fresh machine
    the answer is no, which used to be a ModuleNotFoundError traceback on the terminal."""
    setup = (ROOT / "scripts" / "setup").read_text()
    probe = next(line for line in setup.splitlines() if '.venv/bin/python -c "$needed"' in line)
    assert '-c "$needed" 2>/dev/null' in probe
    script = 'needed="import kvmpy_no_such_module"; ' + probe.replace("then", "then echo INSTALL; fi")
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert "INSTALL" in done.stdout and "Traceback" not in done.stderr, done.stderr
