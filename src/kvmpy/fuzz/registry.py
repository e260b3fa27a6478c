"""Finding a target by name: its module is imported only when it is asked for."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

from kvmpy.fuzz import TARGETS
from kvmpy.fuzz.harness import Target


def load(name: str) -> Target:
    """A fresh instance of target ``name``; KeyError names the targets there are."""
    if name not in TARGETS:
        raise KeyError(f"no fuzz target {name!r}; there are: {', '.join(TARGETS)}")
    module = importlib.import_module(f"kvmpy.fuzz.targets.{TARGETS[name]}")
    target: Target = module.FACTORIES[name]()
    return target


def release(target: Target) -> None:
    """Remove the scratch directory a target made for its files (an image, an initrd), if any."""
    directory = getattr(target, "directory", None)
    if isinstance(directory, Path):
        shutil.rmtree(directory, ignore_errors=True)


__all__ = ["load", "release"]
