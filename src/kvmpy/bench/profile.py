"""Where kvmpy's time goes: a py-spy sampling profile of one run, summarised for the report.

py-spy samples every thread of the VMM from outside the process, so the vCPU
threads' exit loops show up (cProfile sees only the thread that starts it).
"""

from __future__ import annotations

import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from kvmpy.bench.measure import command

IMPORT_MACHINERY = (
    "_call_with_frames_removed",
    "_find_and_load",
    "_load_unlocked",
    "exec_module",
    "_handle_fromlist",
    "_find_spec",
    "FileFinder.",
    "FileLoader.",
    "_compile_bytecode",
    "SourceLoader.",
    "_LoaderBasics.",
    "_run_module_as_main",
    "_run_code",
)


def _py_spy() -> str | None:
    """py-spy from PATH, or from the virtualenv kvmpy runs in."""
    beside_python = Path(sys.executable).with_name("py-spy")
    return shutil.which("py-spy") or (str(beside_python) if beside_python.exists() else None)


def leaf_shares(raw: str, limit: int = 10) -> list[tuple[str, float]]:
    """From py-spy's raw (collapsed stack) output: the innermost frames and their share of samples."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame.strip() for frame in stack.split(";")]
        # Module bodies run under importlib's frames: charge the import to the module itself.
        own = [frame for frame in frames if not frame.startswith(IMPORT_MACHINERY)] or frames
        counts[own[-1]] += int(count)
    total = sum(counts.values()) or 1
    return [(frame, count / total) for frame, count in counts.most_common(limit)]


def profile_run(guest: Path, cmdline: str, title: str) -> str:
    """A Markdown section with the top frames of ``kvmpy run`` on ``guest``, or why there is none."""
    py_spy = _py_spy()
    if py_spy is None:
        return f"### Profile: {title}\n\npy-spy is not installed (pip install py-spy), so no profile.\n"
    with tempfile.TemporaryDirectory() as scratch:
        raw_path = Path(scratch) / "profile.txt"
        done = subprocess.run(
            [py_spy, "record", "--format", "raw", "--rate", "500", "-o", str(raw_path), "--",
             *command("kvmpy", guest, cmdline)],
            capture_output=True,
            text=True,
            timeout=300,
        )  # fmt: skip
        if not raw_path.exists():
            return f"### Profile: {title}\n\npy-spy failed: {done.stderr.strip().splitlines()[-1:]}\n"
        shares = leaf_shares(raw_path.read_text())
    rows = "\n".join(f"| {share:.0%} | `{frame}` |" for frame, share in shares)
    return (
        f"### Profile: {title}\n\n"
        "py-spy samples of all threads of `kvmpy run` (innermost frame; `Vcpu.run` is the KVM_RUN "
        "ioctl, time spent in the kernel and the guest):\n\n"
        f"| share of samples | frame |\n|---:|---|\n{rows}\n"
    )


__all__ = ["leaf_shares", "profile_run"]
