"""What the jail is to be: Firecracker's jailer options, validated.

The names, defaults and formats are those of Firecracker's jailer (its
docs/jailer.md), so tools that drive it can drive ``kvmpy jailer``.
"""

from __future__ import annotations

import re
import resource
from dataclasses import dataclass, field
from pathlib import Path

from kvmpy.errors import ConfigError
from kvmpy.jail.command import DEFAULT_CHROOT_BASE  # defined there: `kvmpy --help` needs no dataclass

#: Firecracker's jailer bounds open files to this when no ``no-file`` limit is given.
DEFAULT_NO_FILE = 2048
MAX_ID_LENGTH = 64
_ID = re.compile(r"[A-Za-z0-9-]+")
#: ``--resource-limit`` names and the rlimit each sets.
RESOURCE_LIMITS = {"fsize": resource.RLIMIT_FSIZE, "no-file": resource.RLIMIT_NOFILE}


@dataclass(frozen=True)
class JailOptions:
    id: str
    exec_file: Path
    uid: int
    gid: int
    chroot_base: Path = DEFAULT_CHROOT_BASE
    netns: Path | None = None
    cgroup_version: int = 1
    #: ``(file, value)`` pairs, e.g. ``("cpuset.cpus", "0")``, written in this order.
    cgroups: tuple[tuple[str, str], ...] = ()
    parent_cgroup: str | None = None
    resource_limits: dict[str, int] = field(default_factory=dict)
    daemonize: bool = False
    new_pid_ns: bool = False
    seccomp: bool = True
    #: The name the jail's directory and pid file take, if not the exec file's.
    name: str | None = None

    @property
    def exec_name(self) -> str:
        return self.name if self.name is not None else self.exec_file.name

    @property
    def jail_dir(self) -> Path:
        """``<base>/<exec-name>/<id>``: the pid file's and the root's parent."""
        return self.chroot_base / self.exec_name / self.id

    @property
    def root(self) -> Path:
        """The directory that becomes ``/`` for the VMM."""
        return self.jail_dir / "root"

    @property
    def cgroup_parent(self) -> str:
        return self.parent_cgroup if self.parent_cgroup is not None else self.exec_name

    def limits(self) -> dict[str, int]:
        """The rlimits to set: the given ones, and Firecracker's default for open files."""
        return {"no-file": DEFAULT_NO_FILE, **self.resource_limits}


def check_id(text: str) -> str:
    if not _ID.fullmatch(text) or len(text) > MAX_ID_LENGTH:
        raise ConfigError(
            f"invalid jail id {text!r}: letters, digits and hyphens, at most {MAX_ID_LENGTH} characters"
        )
    return text


def parse_key_value(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise ConfigError(f"invalid {what} {text!r}: expected NAME=VALUE")
    return key, value


def parse_cgroup(text: str) -> tuple[str, str]:
    """``cpuset.cpus=0`` -> ``("cpuset.cpus", "0")``; the file names its controller."""
    name, value = parse_key_value(text, "--cgroup")
    if "/" in name or "." not in name or name.startswith("."):
        raise ConfigError(f"invalid --cgroup {text!r}: expected CONTROLLER.FILE=VALUE, e.g. cpuset.cpus=0")
    return name, value


def parse_resource_limit(text: str) -> tuple[str, int]:
    name, value = parse_key_value(text, "--resource-limit")
    if name not in RESOURCE_LIMITS:
        raise ConfigError(f"invalid --resource-limit {text!r}: known limits are fsize and no-file")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"invalid --resource-limit {text!r}: {value!r} is not a number") from None
    if number < 0:
        raise ConfigError(f"invalid --resource-limit {text!r}: must not be negative")
    return name, number


def parse_parent_cgroup(text: str) -> str:
    parts = Path(text).parts
    if not parts or Path(text).is_absolute() or ".." in parts:
        raise ConfigError(f"invalid --parent-cgroup {text!r}: a relative path without '..'")
    return text
