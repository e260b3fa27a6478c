"""kvmpy's modules compiled ahead of a benchmark or a lab run."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from kvmpy import bytecode


def test_compile_package_writes_fresh_bytecode_for_every_module() -> None:
    target = Path(bytecode.__file__)
    cached = Path(importlib.util.cache_from_source(str(target)))
    cached.unlink(missing_ok=True)
    assert bytecode.compile_package()
    assert cached.exists()
    assert cached.stat().st_mtime >= target.stat().st_mtime
    modules = list(bytecode.PACKAGE_DIR.rglob("*.py"))
    missing = [m for m in modules if not os.path.exists(importlib.util.cache_from_source(str(m)))]
    assert missing == []
