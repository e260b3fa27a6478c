"""The floors beside each exit round trip: bare KVM_RUN loops in Python and C on the same guest.

floor_loop.py runs them in a child process (kvmpy builds and boots the VM, then
only the loop runs). The C loop is compiled here with gcc when the benchmark
starts, into the run's scratch directory.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from kvmpy.bench.measure import Sample
from kvmpy.bench.watch import SOURCE
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
        """One run of ``loop`` ("python" or "c"): the loop's own wall and CPU time as the sample's."""
        done = subprocess.run(
            [sys.executable, "-m", "kvmpy.bench.floor_loop", loop, str(guest), cmdline,
             "--library", str(self.library), "--memory-mib", str(memory_mib)],
            capture_output=True,
            timeout=300,
            env=dict(os.environ, PYTHONPATH=str(SOURCE)),
        )  # fmt: skip
        if done.returncode:
            tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-3:]
            raise HostError(f"the {LOOPS[loop]} failed on {guest.name}: {tail}")
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
        if result["status"] != 0:
            raise HostError(f"the {LOOPS[loop]} ended {guest.name} with status {result['status']}")
        return Sample(loop, float(result["seconds"]), None, float(result["cpu_seconds"]), 0, 0, b"")


__all__ = ["LOOPS", "FloorLoops", "compile_c_loop"]
