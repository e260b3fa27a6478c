"""The VMM's cgroup: v1 (one hierarchy per controller) or v2 (one unified hierarchy).

As Firecracker's jailer does: the cgroup is ``<base>/<parent>/<id>``, where
``<base>`` is found in /proc/mounts (for v1 the mount of the controller a
``--cgroup`` file belongs to, ``cpuset.cpus`` -> cpuset; for v2 the cgroup2
mount), each value is written to its file, and the process joins (``tasks`` in
v1, ``cgroup.procs`` in v2). Hosts mount both kinds at once (this one has v1
controllers beside a v2 hierarchy with none), so the version is chosen, not guessed;
:func:`available_versions` says what a host has.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvmpy.errors import ConfigError

MOUNTS = Path("/proc/mounts")


@dataclass(frozen=True)
class Mount:
    path: Path
    fstype: str
    options: frozenset[str]


def mounts(table: Path = MOUNTS) -> list[Mount]:
    found = []
    for line in table.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
            found.append(Mount(Path(fields[1]), fields[2], frozenset(fields[3].split(","))))
    return found


def available_versions(table: Path = MOUNTS) -> set[int]:
    return {1 if m.fstype == "cgroup" else 2 for m in mounts(table)}


def controller_of(file_name: str) -> str:
    return file_name.split(".", 1)[0]


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as error:
        raise ConfigError(f"cannot write {value!r} to {path}: {error.strerror}") from None


def _make_dirs(base: Path, relative: Path, inherit: tuple[str, ...] = ()) -> Path:
    """mkdir each level under ``base``; a new v1 cpuset level copies its parent's cpus and mems,
    which start empty (and a cpuset without them takes no task)."""
    path = base
    for part in relative.parts:
        parent, path = path, path / part
        if not path.is_dir():
            try:
                path.mkdir()
            except OSError as error:
                raise ConfigError(f"cannot create the cgroup {path}: {error.strerror}") from None
        for name in inherit:
            if not (path / name).read_text().strip():
                _write(path / name, (parent / name).read_text().strip())
    return path


def join_v1(
    values: tuple[tuple[str, str], ...], relative: Path, pid: int, table: Path = MOUNTS
) -> list[Path]:
    """Create the cgroup in each controller's hierarchy, write the values, add ``pid``."""
    v1 = [m for m in mounts(table) if m.fstype == "cgroup"]
    made: dict[Path, Path] = {}
    for name, value in values:
        controller = controller_of(name)
        mount = next((m for m in v1 if controller in m.options), None)
        if mount is None:
            raise ConfigError(f"no cgroup v1 hierarchy has the {controller} controller (see /proc/mounts)")
        if mount.path not in made:
            inherit = ("cpuset.cpus", "cpuset.mems") if "cpuset" in mount.options else ()
            made[mount.path] = _make_dirs(mount.path, relative, inherit)
        _write(made[mount.path] / name, value)
    for path in made.values():
        _write(path / "tasks", str(pid))
    return list(made.values())


def join_v2(values: tuple[tuple[str, str], ...], relative: Path, pid: int, table: Path = MOUNTS) -> Path:
    """Create the cgroup in the unified hierarchy, enable the controllers its files need on
    every level above it, write the values, move ``pid`` in."""
    mount = next((m for m in mounts(table) if m.fstype == "cgroup2"), None)
    if mount is None:
        raise ConfigError("no cgroup v2 hierarchy is mounted (see /proc/mounts)")
    controllers = sorted({controller_of(name) for name, _ in values} - {"cgroup"})
    available = set((mount.path / "cgroup.controllers").read_text().split())
    missing = [c for c in controllers if c not in available]
    if missing:
        raise ConfigError(
            f"the cgroup v2 hierarchy at {mount.path} has no {', '.join(missing)} controller "
            "(bound to a v1 hierarchy on this host?)"
        )
    path = mount.path
    for part in relative.parts:
        for controller in controllers:
            _write(path / "cgroup.subtree_control", f"+{controller}")
        path = _make_dirs(path, Path(part))
    for name, value in values:
        _write(path / name, value)
    _write(path / "cgroup.procs", str(pid))
    return path


def join(version: int, values: tuple[tuple[str, str], ...], relative: Path, pid: int) -> list[Path]:
    if version == 1:
        return join_v1(values, relative, pid)
    if version == 2:
        return [join_v2(values, relative, pid)]
    raise ConfigError(f"invalid --cgroup-version {version}: 1 or 2")
