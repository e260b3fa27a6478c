"""Compile kvmpy's modules to bytecode ahead of a timed or emulated run.

An installed package carries .pyc files; a checkout run with
PYTHONDONTWRITEBYTECODE, or read-only as the lab mounts it, compiles every
module from source at each start (60 ms here, far more under the lab's TCG).
Benchmarks and lab runs call :func:`compile_package` first, so they time
kvmpy as a user would run it.
"""

from __future__ import annotations

import compileall
import contextlib
import io
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def compile_package() -> bool:
    """Write up-to-date .pyc files for the package; False if its directory is not writable."""
    with contextlib.redirect_stdout(io.StringIO()):
        return bool(compileall.compile_dir(PACKAGE_DIR, quiet=1))


__all__ = ["compile_package"]
