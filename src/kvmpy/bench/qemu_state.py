"""QEMU's side of the snapshot and migration benchmarks, driven over QMP.

A QEMU "snapshot" is its migration stream written to a file (``migrate
exec:cat > FILE``; QEMU 7.2 has no ``file:`` URI yet) from a stopped guest,
and a restore is ``-incoming exec:cat FILE``. Migrated from a stopped guest, the
restored QEMU waits paused: the benchmark sends ``cont`` as soon as QMP says
the incoming stream is loaded (polling every millisecond), as kvmpy's
LoadSnapshot with resume_vm resumes by itself. Live migration is two QEMU
processes, ``-incoming unix:PATH`` and ``migrate unix:PATH``, with QEMU's
bandwidth cap lifted (kvmpy has none) and the same 300 ms downtime budget as
kvmpy's default; its downtime is taken from the source's STOP event to the
destination's RESUME event, kvmpy's definition (last guest instruction on the
source to the first on the destination).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmpy.bench.measure import command
from kvmpy.bench.qmp import Qmp, QmpError
from kvmpy.bench.vmm_driver import TICK
from kvmpy.bench.watch import WatchedProcess
from kvmpy.errors import HostError

#: bytes/s: far above what a Unix socket carries here, so QEMU's default cap (32 MiB/s) is out of the way.
UNCAPPED = 64 << 30
DOWNTIME_MS = 300


@dataclass(frozen=True, slots=True)
class QemuMigration:
    total_seconds: float
    downtime_seconds: float
    rounds: int  # dirty-bitmap syncs (QEMU's dirty-sync-count)
    bytes_sent: int


def _start(guest: Path, cmdline: str, memory_mib: int, qmp: Path, *extra: str) -> WatchedProcess:
    argv = command("qemu", guest, cmdline, memory_mib) + ["-qmp", f"unix:{qmp},server=on,wait=off", *extra]
    return WatchedProcess(argv, "QEMU")


def _quit(qmp: Qmp) -> None:
    """Ask QEMU to exit; it may close the socket before it answers."""
    with contextlib.suppress(QmpError, OSError):
        qmp.execute("quit")
    qmp.close()


def _migrate(qmp: Qmp, uri: str, timeout: float) -> tuple[float, dict[str, object]]:
    """Run ``migrate uri`` and wait for it to complete: (seconds it took here, query-migrate's answer).

    The time is measured by the benchmark from the command to the completion event: QEMU 7.2's
    own total-time and downtime read 0 ms on this host's clock now and then.
    """
    qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    qmp.execute("migrate-set-parameters", **{"max-bandwidth": UNCAPPED, "downtime-limit": DOWNTIME_MS})
    began = time.perf_counter()
    qmp.execute("migrate", uri=uri)
    qmp.wait_event("MIGRATION", timeout, status="completed")
    seconds = time.perf_counter() - began
    info = qmp.execute("query-migrate")
    if not isinstance(info, dict) or info.get("status") != "completed":
        raise HostError(f"QEMU's migration to {uri} did not complete: {info}")
    return seconds, info


def _stamp(event: dict[str, Any]) -> float:
    """An event's host wall-clock time (QEMU stamps events with gettimeofday)."""
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


def snapshot(guest: Path, cmdline: str, memory_mib: int, file: Path, scratch: Path, ticks: int = 3) -> float:
    """Seconds QEMU takes to write the stopped guest's state to ``file`` (migrate exec:)."""
    socket_path = scratch / "qemu-snapshot.qmp"
    process = _start(guest, cmdline, memory_mib, socket_path)
    try:
        qmp = Qmp.connect(socket_path)
        process.wait_for(b"tick %d\n" % ticks, 60)
        qmp.execute("stop")
        seconds, _ = _migrate(qmp, f"exec:cat > {file}", 300)
        _quit(qmp)
    finally:
        process.stop()
    return seconds


def restore(guest: Path, cmdline: str, memory_mib: int, file: Path, scratch: Path) -> float:
    """Seconds from starting QEMU with ``-incoming exec:cat FILE`` to the guest's first tick."""
    socket_path = scratch / "qemu-restore.qmp"
    process = _start(guest, cmdline, memory_mib, socket_path, "-incoming", f"exec:cat {file}")
    try:
        qmp = Qmp.connect(socket_path)
        deadline = time.monotonic() + 120
        while (status := qmp.execute("query-status")["status"]) == "inmigrate":
            if time.monotonic() > deadline:
                raise HostError("QEMU did not finish loading its snapshot in 120 s")
            time.sleep(0.001)
        if status != "running":
            qmp.execute("cont")
        seconds = process.wait_for(TICK, 60) - process.started
        _quit(qmp)
    finally:
        process.stop()
    return seconds


def migrate(guest: Path, cmdline: str, memory_mib: int, scratch: Path, ticks: int = 3) -> QemuMigration:
    """One live migration between two QEMU processes over a Unix socket, as QEMU reports it."""
    address = scratch / "qemu-migration.sock"
    source_qmp, destination_qmp = scratch / "qemu-source.qmp", scratch / "qemu-destination.qmp"
    destination = _start(guest, cmdline, memory_mib, destination_qmp, "-incoming", f"unix:{address}")
    source = _start(guest, cmdline, memory_mib, source_qmp)
    try:
        to_destination = Qmp.connect(destination_qmp)
        to_source = Qmp.connect(source_qmp)
        source.wait_for(b"tick %d\n" % ticks, 60)
        seconds, info = _migrate(to_source, f"unix:{address}", 300)
        destination.wait_for(TICK, 60)  # the guest runs on the destination
        # Downtime as kvmpy measures it: the source's last guest instruction (its STOP event)
        # to the destination's first (its RESUME event), both on the host's clock.
        stopped = _stamp(to_source.wait_event("STOP", 10))
        resumed = _stamp(to_destination.wait_event("RESUME", 10))
        ram = info.get("ram", {})
        assert isinstance(ram, dict)
        result = QemuMigration(
            total_seconds=seconds,
            downtime_seconds=resumed - stopped,
            rounds=int(ram.get("dirty-sync-count", 0)),
            bytes_sent=int(ram.get("transferred", 0)),
        )
        _quit(to_source)
        _quit(to_destination)
    finally:
        source.stop()
        destination.stop()
        address.unlink(missing_ok=True)
    return result


__all__ = ["QemuMigration", "migrate", "restore", "snapshot"]
