"""Import, before the jail closes, every module the VMM may import later.

Inside the jail the host's file system is gone, so a module CPython has not
loaded yet cannot be loaded at all, and kvmpy imports many modules lazily (so
that ``kvmpy run`` starts fast). The jail loads them all first: kvmpy's own, but
for the parts that never run in a jailed VMM, and the standard library modules
those import lazily in turn.
"""

from __future__ import annotations

import importlib
import pkgutil

import kvmpy

#: Parts of kvmpy a jailed VMM never runs (they drive the lab, benchmarks, fuzzing and tests).
NOT_IN_THE_JAIL = ("kvmpy.lab", "kvmpy.bench", "kvmpy.fuzz", "kvmpy.testing", "kvmpy.ctl", "kvmpy.pyspy")
#: Modules imported on first use (the seccomp bindings load libseccomp as they are imported).
LAZY_STANDARD_MODULES = ("encodings.idna", "encodings.ascii", "encodings.latin_1", "_strptime", "pyseccomp")


def _wanted(name: str) -> bool:
    return not any(name == part or name.startswith(part + ".") for part in NOT_IN_THE_JAIL)


def preload() -> list[str]:
    """Import every module a jailed VMM may need; returns the names of kvmpy's that were loaded."""
    names = [
        info.name
        for info in pkgutil.walk_packages(kvmpy.__path__, prefix="kvmpy.")
        if _wanted(info.name) and not info.name.endswith("__main__")
    ]
    for name in (*names, *LAZY_STANDARD_MODULES):
        importlib.import_module(name)
    return names
