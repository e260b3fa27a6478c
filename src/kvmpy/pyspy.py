"""py-spy: sample a running kvmpy from outside the process and summarise where its time went.

py-spy sees every thread of the VMM (cProfile sees only the one that starts it), so
the vCPU threads' exit loops and the device event loop show up. Used by ``kvmpy
bench`` on this machine and by lab scenarios that ask for a profile.
"""

from __future__ import annotations

import collections
import shutil
import sys
from pathlib import Path

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


def py_spy() -> str | None:
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


def record_command(
    py_spy_path: str, raw_output: Path, command: list[str] | None = None, *, pid: int = 0, rate: int = 100
) -> list[str]:
    """py-spy sampling ``command`` (or the running process ``pid``) ``rate`` times a second,
    without stopping it (the VMM's timing stays its own), in raw (collapsed stack) format."""
    target = ["--pid", str(pid)] if pid else ["--", *(command or [])]
    return [
        py_spy_path, "record", "--nonblocking", "--format", "raw", "--rate", str(rate),
        "-o", str(raw_output), *target,
    ]  # fmt: skip


__all__ = ["leaf_shares", "py_spy", "record_command"]
