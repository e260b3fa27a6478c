"""Kernel modules from a Debian kernel package, in the order they must be loaded.

The package ships no modules.dep (depmod runs at install time), so the
dependencies come from each module's own ``depends=`` modinfo string.
"""

from __future__ import annotations

import lzma
from dataclasses import dataclass
from pathlib import Path

from kvmpy.lab import LabError


@dataclass(frozen=True, slots=True)
class KernelTree:
    """An unpacked kernel package: its vmlinuz, version and module files."""

    root: Path
    version: str
    vmlinuz: Path

    @classmethod
    def find(cls, root: Path) -> KernelTree:
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise LabError(f"no vmlinuz in {root}/boot")
        version = kernels[0].name.removeprefix("vmlinuz-")
        return cls(root, version, kernels[0])

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.version


def normalise(name: str) -> str:
    return name.replace("-", "_")


def module_index(tree: KernelTree) -> dict[str, Path]:
    """Module name -> file, for every module in the package."""
    index = {}
    for path in tree.modules_dir.rglob("*.ko*"):
        index[normalise(path.name.split(".ko")[0])] = path
    return index


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def dependencies(data: bytes) -> list[str]:
    marker = b"depends="
    position = data.find(b"\0" + marker)
    if position < 0:
        return []
    end = data.index(b"\0", position + 1)
    value = data[position + 1 + len(marker) : end].decode()
    return [normalise(name) for name in value.split(",") if name]


def load_order(tree: KernelTree, wanted: list[str]) -> list[tuple[str, Path]]:
    """``wanted`` modules and their dependencies, dependencies first.

    Modules built into the kernel (listed in modules.builtin) are skipped;
    unknown names raise LabError.
    """
    index = module_index(tree)
    builtin_file = tree.modules_dir / "modules.builtin"
    builtin = set()
    if builtin_file.exists():
        builtin = {normalise(Path(line).name.split(".ko")[0]) for line in builtin_file.read_text().split()}
    order: list[tuple[str, Path]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = normalise(name)
        if name in seen or name in builtin:
            return
        seen.add(name)
        path = index.get(name)
        if path is None:
            raise LabError(f"module {name} is not in kernel package {tree.version}")
        for dependency in dependencies(read_module(path)):
            visit(dependency)
        order.append((name, path))

    for name in wanted:
        visit(name)
    return order


__all__ = ["KernelTree", "dependencies", "load_order", "module_index", "normalise", "read_module"]
