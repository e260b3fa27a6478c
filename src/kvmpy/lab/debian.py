"""Debian packages for the lab and guest images: fetched with apt-get, cached, unpacked."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from kvmpy.lab import LabError, progress


def cache_dir() -> Path:
    """Where kvmpy keeps downloaded packages and built images."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    path = Path(base) / "kvmpy"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _run(command: list[str], what: str, cwd: Path | None = None) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd)
    except FileNotFoundError:
        raise LabError(f"{what}: {command[0]} is not installed (run scripts/setup)") from None
    if done.returncode:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise LabError(f"{what} failed: {detail[-1] if detail else 'exit ' + str(done.returncode)}")
    return done.stdout


def resolve_kernel_package(name: str) -> str:
    """The versioned package behind a meta package such as linux-image-amd64."""
    if re.match(r"linux-image-\d", name):
        return name
    output = _run(["apt-cache", "depends", name], f"looking up {name}")
    for line in output.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\d\S*)", line)
        if match:
            return match.group(1)
    _run(["apt-get", "update", "-qq"], "apt-get update")
    output = _run(["apt-cache", "depends", name], f"looking up {name}")
    for line in output.splitlines():
        match = re.match(r"\s*Depends:\s*(linux-image-\d\S*)", line)
        if match:
            return match.group(1)
    raise LabError(f"cannot find the kernel package behind {name}")


def fetch_package(name: str) -> Path:
    """Download and unpack Debian package ``name``; returns the unpacked tree (cached)."""
    root = cache_dir() / "packages"
    unpacked = root / name
    if (unpacked / ".complete").exists():
        return unpacked
    root.mkdir(parents=True, exist_ok=True)
    debs = list(root.glob(f"{name}_*.deb"))
    if not debs:
        with progress.download(name, root, progress.package_size(name) if progress.shown() else None):
            try:
                _run(["apt-get", "download", name], f"downloading {name}", cwd=root)
            except LabError:
                _run(["apt-get", "update", "-qq"], "apt-get update")
                _run(["apt-get", "download", name], f"downloading {name}", cwd=root)
        debs = list(root.glob(f"{name}_*.deb"))
    if not debs:
        raise LabError(f"downloading {name} produced no .deb file")
    unpacked.mkdir(exist_ok=True)
    with progress.step(f"unpacking {debs[0].name}"):
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpacked)], f"unpacking {debs[0].name}")
    (unpacked / ".complete").write_text(debs[0].name)
    return unpacked


def package_version(unpacked: Path) -> str:
    """The .deb file name a tree came from (names the version)."""
    return (unpacked / ".complete").read_text().strip()


__all__ = ["cache_dir", "fetch_package", "package_version", "resolve_kernel_package"]
