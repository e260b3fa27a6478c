"""Where kvmpy's time goes: a py-spy sampling profile of one run, summarised for the report.

py-spy samples every thread of the VMM from outside the process, so the vCPU
threads' exit loops show up (cProfile sees only the thread that starts it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from kvmpy.bench.measure import command
from kvmpy.bench.watch import SOURCE
from kvmpy.pyspy import leaf_shares, py_spy, record_command


def profile_run(guest: Path, cmdline: str, title: str) -> str:
    """A Markdown section with the top frames of ``kvmpy run`` on ``guest``, or why there is none."""
    return profile_command(command("kvmpy", guest, cmdline), title)


def profile_command(
    argv: list[str], title: str, *, what: str = "`kvmpy run`", while_running: Callable[[], None] | None = None
) -> str:
    """A Markdown section with the top frames of the Python process ``argv`` (py-spy starts it).

    ``while_running``, if given, is called once the process started; when it returns the
    process is terminated (for a VMM that would otherwise run on, e.g. one serving its API).
    """
    py_spy_path = py_spy()
    if py_spy_path is None:
        return f"### Profile: {title}\n\npy-spy is not installed (pip install py-spy), so no profile.\n"
    with tempfile.TemporaryDirectory() as scratch:
        raw_path = Path(scratch) / "profile.txt"
        recorder = subprocess.Popen(
            record_command(py_spy_path, raw_path, argv, rate=500),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(SOURCE)),
        )
        try:
            if while_running is not None:
                try:
                    while_running()
                finally:
                    for child in _children(recorder.pid):
                        os.kill(child, signal.SIGTERM)
            _, stderr = recorder.communicate(timeout=300)
        except BaseException:
            recorder.kill()
            recorder.communicate()
            raise
        if not raw_path.exists():
            return f"### Profile: {title}\n\npy-spy failed: {stderr.strip().splitlines()[-1:]}\n"
        shares = leaf_shares(raw_path.read_text())
    return profile_table(title, shares, what)


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (py-spy's: the profiled process)."""
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def profile_table(title: str, shares: list[tuple[str, float]], what: str = "`kvmpy run`") -> str:
    """A Markdown section: the innermost frames of a py-spy profile and their share of samples."""
    if not shares:
        return f"### Profile: {title}\n\nNo samples.\n"
    rows = "\n".join(f"| {share:.0%} | `{frame}` |" for frame, share in shares)
    return (
        f"### Profile: {title}\n\n"
        f"py-spy samples of all busy threads of {what} (innermost frame; the KVM_RUN ioctl, time "
        "in the kernel and the guest, is `VcpuThread._loop` at its `ioctl(fd, kvm_run, 0)` line, "
        "or `Vcpu.enter`):\n\n"
        f"| share of samples | frame |\n|---:|---|\n{rows}\n"
    )


__all__ = ["profile_command", "profile_run", "profile_table"]
