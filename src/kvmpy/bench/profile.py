"""Where kvmpy's time goes: a py-spy sampling profile of one run, summarised for the report.

py-spy samples every thread of the VMM from outside the process, so the vCPU
threads' exit loops show up (cProfile sees only the thread that starts it).
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from kvmpy.bench.measure import command
from kvmpy.pyspy import leaf_shares, py_spy, record_command


def profile_run(guest: Path, cmdline: str, title: str) -> str:
    """A Markdown section with the top frames of ``kvmpy run`` on ``guest``, or why there is none."""
    py_spy_path = py_spy()
    if py_spy_path is None:
        return f"### Profile: {title}\n\npy-spy is not installed (pip install py-spy), so no profile.\n"
    with tempfile.TemporaryDirectory() as scratch:
        raw_path = Path(scratch) / "profile.txt"
        done = subprocess.run(
            record_command(py_spy_path, raw_path, command("kvmpy", guest, cmdline), rate=500),
            capture_output=True,
            text=True,
            timeout=300,
        )
        if not raw_path.exists():
            return f"### Profile: {title}\n\npy-spy failed: {done.stderr.strip().splitlines()[-1:]}\n"
        shares = leaf_shares(raw_path.read_text())
    return profile_table(title, shares)


def profile_table(title: str, shares: list[tuple[str, float]]) -> str:
    """A Markdown section: the innermost frames of a py-spy profile and their share of samples."""
    if not shares:
        return f"### Profile: {title}\n\nNo samples.\n"
    rows = "\n".join(f"| {share:.0%} | `{frame}` |" for frame, share in shares)
    return (
        f"### Profile: {title}\n\n"
        "py-spy samples of all busy threads of `kvmpy run` (innermost frame; `Vcpu.run` is the "
        "KVM_RUN ioctl: time in the kernel and the guest):\n\n"
        f"| share of samples | frame |\n|---:|---|\n{rows}\n"
    )


__all__ = ["profile_run", "profile_table"]
