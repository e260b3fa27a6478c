"""Finding a target by name: its module is imported only when it is asked for."""

from __future__ import annotations

import importlib

from kvmpy.fuzz import TARGETS
from kvmpy.fuzz.harness import Target


def load(name: str) -> Target:
    """A fresh instance of target ``name``; KeyError names the targets there are."""
    if name not in TARGETS:
        raise KeyError(f"no fuzz target {name!r}; there are: {', '.join(TARGETS)}")
    module = importlib.import_module(f"kvmpy.fuzz.targets.{TARGETS[name]}")
    target: Target = module.FACTORIES[name]()
    return target


__all__ = ["load"]
