"""Beside a jailed VMM in the lab: what its API answers and what Linux says of its process.

``python -m kvmpy.lab.jail_probe API_SOCKET PID_FILE CGROUP OUT`` waits for the jailed
VMM's API socket (reached through the symlink ``kvmpy run --jail`` leaves at the path
given), waits until its guest has run a while, then writes one JSON object to OUT: the
API's ``GET /`` answer, the process's /proc status lines that show the jail (Seccomp,
NoNewPrivs, ids, capabilities), its namespaces against this process's, and the cgroup's
values with whether the pid is in it. The lab scenario's tests read it back.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from kvmpy.lab.api_driver import UnixHTTPConnection

#: Ask after the guest has been running this long (the VMM's threads have all started).
SETTLE_SECONDS = 30.0
WAIT_SECONDS = 600.0
STATUS_KEYS = (
    "Uid",
    "Gid",
    "Groups",
    "CapEff",
    "CapPrm",
    "NoNewPrivs",
    "Seccomp",
    "Seccomp_filters",
    "NSpid",
)


def _get(socket_path: str, path: str) -> object:
    connection = UnixHTTPConnection(socket_path)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read() or b"null")
    finally:
        connection.close()


def _status(pid: int) -> dict[str, str]:
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in STATUS_KEYS:
            found[key] = " ".join(value.split())
    return found


def probe(socket_path: str, pid_file: Path, cgroup: Path) -> dict[str, object]:
    deadline = time.monotonic() + WAIT_SECONDS
    while not (os.path.exists(socket_path) and pid_file.exists()) and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(SETTLE_SECONDS)
    pid = int(pid_file.read_text())
    namespaces = {
        name: os.readlink(f"/proc/{pid}/ns/{name}") != os.readlink(f"/proc/self/ns/{name}")
        for name in ("mnt", "ipc", "uts", "pid", "net")
    }
    values = {name: (cgroup / name).read_text().strip() for name in ("cpu.weight", "pids.max")}
    return {
        "api": _get(socket_path, "/"),
        "status": _status(pid),
        "new_namespaces": namespaces,
        "cgroup": values,
        "in_cgroup": str(pid) in (cgroup / "cgroup.procs").read_text().split(),
        "root_entries": sorted(os.listdir(f"/proc/{pid}/root")),  # its / as it sees it
    }


def main(argv: list[str]) -> int:
    socket_path, pid_file, cgroup, out = argv
    try:
        facts = probe(socket_path, Path(pid_file), Path(cgroup))
    except Exception as error:  # the test prints the facts: say what failed instead
        facts = {"error": f"{type(error).__name__}: {error}"}
    Path(out).write_text(json.dumps(facts))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
