"""kvmpy ctl snapshot and migrate against real kvmpy processes (the counter guest)."""

from __future__ import annotations

import re
import time
from pathlib import Path
from subprocess import Popen

from kvmpy.testing.process import kvmpy, read_until, start_kvmpy


def _ticks(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"tick (\d+)\n", text)]


def _read_ticks(process: Popen[str], count: int) -> str:
    """What ``process`` printed until ``count`` ticks (or the timeout)."""
    return read_until(process, lambda text: len(_ticks(text)) >= count)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_ctl_snapshot_keeps_the_vm_running_and_restores_elsewhere(guests: Path, tmp_path: Path) -> None:
    sock = tmp_path / "api.sock"
    source = start_kvmpy("run", "--api-sock", str(sock), "--kernel", str(guests / "counter.elf"),
                         "--cmdline", "gap=20000000")
    try:
        before = _ticks(_read_ticks(source, 3))
        done = kvmpy("ctl", str(sock), "snapshot", str(tmp_path / "snap"))
        assert done.returncode == 0, done.stderr
        assert "Full snapshot" in done.stdout and "the VM runs again" in done.stdout, done.stdout
        assert _ticks(_read_ticks(source, 2))  # still counting after the snapshot
    finally:
        source.terminate()
        source.communicate(timeout=20)
    restored = start_kvmpy("run", "--restore", str(tmp_path / "snap"))
    try:
        after = _ticks(_read_ticks(restored, 2))
    finally:
        restored.terminate()
        restored.communicate(timeout=20)
    assert before and after and after[0] > before[-1]


def test_ctl_migrate_moves_the_guest_and_ends_the_source(guests: Path, tmp_path: Path) -> None:
    sock, incoming = tmp_path / "api.sock", tmp_path / "incoming.sock"
    destination = start_kvmpy("run", "--incoming", f"unix:{incoming}")
    source = start_kvmpy("run", "--api-sock", str(sock), "--kernel", str(guests / "counter.elf"),
                         "--cmdline", "gap=20000000", "--cpus", "2")
    try:
        before = _read_ticks(source, 3)
        _wait_for(incoming)
        done = kvmpy("ctl", str(sock), "migrate", f"unix:{incoming}", "--no-progress", timeout=120)
        assert done.returncode == 0, done.stderr
        assert "migrated to unix:" in done.stdout and "downtime" in done.stdout, done.stdout
        source.wait(timeout=30)
        assert source.stdout is not None and source.stderr is not None
        # read(), not communicate(): communicate reads the pipe itself and would skip what
        # readline() had already buffered.
        rest, errors = source.stdout.read(), source.stderr.read()
        assert source.returncode == 0, errors
        after = _read_ticks(destination, 3)
    finally:
        for process in (source, destination):
            if process.poll() is None:
                process.terminate()
                process.communicate(timeout=20)
    ticks = _ticks(before + rest + after)  # a line the pause cut is finished on the destination
    assert len(_ticks(after)) >= 3 and ticks == list(range(1, len(ticks) + 1)), ticks
