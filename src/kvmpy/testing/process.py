"""kvmpy as a separate process, the way a user starts it, for tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

#: The source tree this kvmpy was imported from (tests run the same code in the child).
SOURCE = Path(__file__).resolve().parents[2]


def _environment() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(SOURCE))


def kvmpy(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``kvmpy ARGS`` to its end, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "kvmpy", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_environment(),
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def start_kvmpy(*args: str) -> subprocess.Popen[str]:
    """``kvmpy ARGS`` in the background, its output in pipes."""
    return subprocess.Popen(
        [sys.executable, "-m", "kvmpy", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_environment(),
    )

def read_until(
    process: subprocess.Popen[str], enough: Callable[[str], bool], timeout: float = 30.0
) -> str:
    """What ``process`` printed until ``enough(printed)`` holds, it exits, or the timeout."""
    assert process.stdout is not None
    seen = ""
    deadline = time.monotonic() + timeout
    while not enough(seen) and time.monotonic() < deadline and process.poll() is None:
        seen += process.stdout.readline()
    return seen


def proc_status(path: Path) -> dict[str, str]:
    """A /proc ``status`` file (a process's or a thread's) as its fields, values stripped."""
    lines = path.read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


__all__ = ["SOURCE", "kvmpy", "proc_status", "read_until", "start_kvmpy"]
