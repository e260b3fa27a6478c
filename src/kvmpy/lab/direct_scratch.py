"""Scratch space that supports O_DIRECT, for disks opened with ``direct=on``.

The lab's scratch directory is a tmpfs, and tmpfs refuses O_DIRECT before
Linux 6.6 (the lab runs Debian's 6.1). Where the scratch file system takes
O_DIRECT it is used as it is; otherwise an ext4 file system on a loop
device over a sparse file in the scratch space is made once and mounted
(this needs root, as the lab's command has).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

from kvmpy.errors import HostError

#: Size of the sparse ext4 file system (only what is written takes memory).
LOOP_FS_SIZE = "2G"
_root: Path | None = None


def takes_o_direct(directory: Path) -> bool:
    """Whether files in ``directory`` can be opened with O_DIRECT."""
    with tempfile.NamedTemporaryFile(dir=directory) as probe:
        try:
            os.close(os.open(probe.name, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            return False
    return True


def direct_scratch_root() -> Path:
    """A directory on a file system that supports O_DIRECT (made on first use)."""
    global _root
    if _root is not None:
        return _root
    scratch = Path(tempfile.gettempdir())
    if takes_o_direct(scratch):
        _root = scratch
        return _root
    mount_point, image = scratch / "kvmpy-direct", scratch / "kvmpy-direct.ext4"
    mount_point.mkdir(exist_ok=True)
    if not os.path.ismount(mount_point):
        commands = [
            ["truncate", "-s", LOOP_FS_SIZE, str(image)],
            ["mkfs.ext4", "-q", "-F", str(image)],
            ["mount", "-o", "loop", str(image), str(mount_point)],
        ]
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                message = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise HostError(f"making O_DIRECT scratch space: {' '.join(command[:1])}: {message}")
        os.chmod(mount_point, 0o1777)
    _root = mount_point
    return _root


__all__ = ["direct_scratch_root", "takes_o_direct"]
