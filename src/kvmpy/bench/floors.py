"""The floors beside each exit round trip: bare KVM_RUN loops in Python and C on the same guest.

floor_loop.py runs them (kvmpy builds and boots the VM, then only the loop runs).
The C loop is compiled here with gcc when the benchmark starts, into the run's
scratch directory.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kvmpy.bench.measure import Sample
from kvmpy.errors import HostError

C_SOURCE = Path(__file__).with_name("floor_loop.c")
#: The loops, as named in the samples and the report.
LOOPS = {"python": "bare Python KVM_RUN loop", "c": "bare C KVM_RUN loop"}


def compile_c_loop(directory: Path) -> Path:
    """floor_loop.c as a shared object in ``directory``."""
    if shutil.which("gcc") is None:
        raise HostError("the C floor of the exit benchmarks needs gcc (run scripts/setup)")
    library = directory / "floor_loop.so"
    done = subprocess.run(
        ["gcc", "-O2", "-shared", "-fPIC", "-Wall", "-o", str(library), str(C_SOURCE)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise HostError(f"compiling {C_SOURCE.name} failed:\n{done.stderr.strip()}")
    return library


@dataclass(frozen=True, slots=True)
class FloorLoops:
    """What a storm run needs to run the floors too: the compiled C loop."""

    library: Path

    def run(self, loop: str, guest: Path, cmdline: str, memory_mib: int) -> Sample:
        """One run of ``loop`` ("python" or "c"): the loop's own wall and CPU time as the sample's.

        It runs in this process: only the loop is timed, so a fresh interpreter would add
        nothing but its start-up, which on a busy host costs more than the loop.
        """
        from kvmpy.bench.floor_loop import run_loop

        status, seconds, cpu, _ = run_loop(loop, guest, cmdline, memory_mib, self.library)
        if status != 0:
            raise HostError(f"the {LOOPS[loop]} ended {guest.name} with status {status}")
        return Sample(loop, seconds, None, cpu, 0, 0, b"")


__all__ = ["LOOPS", "FloorLoops", "compile_c_loop"]
