"""Build and locate the C/assembly test guests in guests/ (for tests and benchmarks)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from kvmpy.errors import HostError

GUESTS_DIR = Path(__file__).resolve().parents[3] / "guests"


def build_guests() -> Path:
    """Run ``make -C guests`` (a no-op when up to date); returns the build directory."""
    if shutil.which("make") is None or shutil.which("gcc") is None:
        raise HostError("building the test guests needs make and gcc (run scripts/setup)")
    done = subprocess.run(["make", "-s", "-C", str(GUESTS_DIR)], capture_output=True, text=True)
    if done.returncode:
        raise HostError(f"building the test guests failed:\n{done.stderr.strip()}")
    return GUESTS_DIR / "build"


def guest_path(name: str) -> Path:
    """The ELF of test guest ``name`` (e.g. "hello"), built if needed."""
    return build_guests() / f"{name}.elf"


__all__ = ["GUESTS_DIR", "build_guests", "guest_path"]
