"""Snapshots, restore and live migration on this machine, kvmpy and QEMU alternating (issue 12).

Snapshots: the counter guest with 256 MiB and 1 GiB of RAM, paused after a few
ticks. Create time is the CreateSnapshot action (kvmpy) against ``migrate
exec:`` of the stopped guest (QEMU); sizes are the files' apparent and on-disk
sizes (kvmpy's memory file is sparse, QEMU's stream skips zero pages).
Restore: process start to the guest's first tick, ``kvmpy run --restore DIR``
against ``qemu -incoming exec:cat FILE``; and kvmpy's LoadSnapshot call alone,
in a fresh VMM, against Firecracker's published 8.5 ms.

Migration: two processes over a Unix socket, for the idle counter guest and
for the dirty guest writing at a fixed rate; total time, downtime, rounds and
bytes as each VMM reports them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmpy.bench import qemu_state
from kvmpy.bench.metric import Metric, Target
from kvmpy.bench.vmm_driver import TICK
from kvmpy.bench.watch import WatchedProcess
from kvmpy.errors import HostError
from kvmpy.testing.guests import guest_path

WHERE = "this machine"
FIRECRACKER_LOAD_MS = 8.5  # Firecracker's published snapshot load latency (docs/snapshotting)
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class StatePlan:
    repetitions: int
    snapshot_sizes_mib: tuple[int, ...] = (256, 1024)
    dirty_rate_mib: int = 64  # MiB/s the dirty guest writes
    dirty_span_mib: int = 128  # across this much of its RAM
    dirty_ticks: int = 10  # 100 ms ticks before the migration starts
    migration_mib: int = 256  # the migrated guests' RAM


def tsc_khz() -> int:
    """The guest TSC's frequency as KVM sets it (KVM_GET_TSC_KHZ on a scratch vCPU)."""
    from kvmpy.kvm.system import System

    with System() as system:
        vm = system.create_vm()
        try:
            vcpu = vm.create_vcpu(0)
            try:
                return vcpu.get_tsc_khz()
            finally:
                vcpu.close()
        finally:
            vm.close()


def _driver(what: str, *args: str, timeout: float = 300) -> dict[str, Any]:
    """Run vmm_driver ``what`` in a child process and return its JSON line (decoded)."""
    process = WatchedProcess(
        [sys.executable, "-m", "kvmpy.bench.vmm_driver", what, *args], f"vmm_driver {what}"
    )
    status = process.wait(timeout)
    process.stop()
    lines = process.output().decode("utf-8", "replace").strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    if status != 0 or "error" in result:
        error = result.get("error") or bytes(process.stderr).decode("utf-8", "replace").strip()[-300:]
        raise HostError(f"kvmpy's {what} failed (status {status}): {error}")
    assert isinstance(result, dict)
    return result


def _sizes(*files: Path) -> tuple[float, float]:
    """(apparent, on-disk) MiB of ``files`` together."""
    stats = [os.stat(f) for f in files]
    return sum(s.st_size for s in stats) / (1 << 20), sum(s.st_blocks * 512 for s in stats) / (1 << 20)


def _counter_cmdline(khz: int) -> str:
    return f"gap={khz * 2}"  # a tick every 2 ms: the first tick after a restore comes soon


def _snapshot_rows(mib: int) -> dict[str, Metric]:
    size = f"{mib} MiB" if mib < 1024 else f"{mib >> 10} GiB"
    guest = f"counter guest, {size}"
    return {
        "create": Metric(
            f"snapshot_create_{mib}",
            f"Snapshot create, paused {guest} (kvmpy CreateSnapshot, QEMU migrate exec:)",
            "ms", WHERE, target=Target(ratio=1.0),
        ),
        "apparent": Metric(
            f"snapshot_apparent_{mib}", f"Snapshot size, apparent ({guest}; state + memory)", "MiB", WHERE
        ),
        "disk": Metric(
            f"snapshot_disk_{mib}",
            f"Snapshot size, on disk ({guest}; state + memory files)",
            "MiB", WHERE, target=Target(ratio=1.0),
        ),
        "restore": Metric(
            f"restore_to_tick_{mib}",
            f"Restore: process start to the guest's first tick ({guest})",
            "ms", WHERE, target=Target(ratio=1.0),
            note="kvmpy run --restore against qemu -incoming exec:cat FILE, then QMP cont (qemu_state.py)",
        ),
        "load": Metric(
            f"snapshot_load_{mib}",
            f"LoadSnapshot call alone, in a fresh VMM ({guest})",
            "ms", WHERE, target=Target(absolute=FIRECRACKER_LOAD_MS),
            note="kvmpy only (QEMU has no separate load call); target: Firecracker's published 8.5 ms",
        ),
        "warm": Metric(
            f"snapshot_load_warm_{mib}",
            f"LoadSnapshot call alone, restore modules imported beforehand ({guest})",
            "ms", WHERE, target=Target(absolute=FIRECRACKER_LOAD_MS),
            note="kvmpy.state, .vmm.machine and .memory imported before the call: the load's own work",
        ),
    }  # fmt: skip


def snapshot_metrics(plan: StatePlan, progress: Progress, scratch: Path, khz: int) -> list[Metric]:
    counter = guest_path("counter")
    cmdline = _counter_cmdline(khz)
    metrics: list[Metric] = []
    for mib in plan.snapshot_sizes_mib:
        rows = _snapshot_rows(mib)
        for index in range(plan.repetitions):
            directory = scratch / f"kvmpy-{mib}"
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            made = _driver("snapshot", "--kernel", str(counter), "--cmdline", cmdline,
                           "--memory-mib", str(mib), "--out", str(directory))  # fmt: skip
            rows["create"].kvmpy.append(float(made["create_seconds"]) * 1000)
            apparent, disk = _sizes(directory / "state", directory / "memory")
            rows["apparent"].kvmpy.append(apparent)
            rows["disk"].kvmpy.append(disk)
            restored = WatchedProcess(
                [sys.executable, "-m", "kvmpy", "run", "--restore", str(directory)], "kvmpy"
            )
            try:
                rows["restore"].kvmpy.append((restored.wait_for(TICK, 60) - restored.started) * 1000)
            finally:
                restored.stop()
            for row, warm in (("load", ()), ("warm", ("--warm",))):
                loaded = _driver("load", "--out", str(directory), *warm)
                rows[row].kvmpy.append(float(loaded["load_seconds"]) * 1000)

            file = scratch / f"qemu-{mib}.snapshot"
            file.unlink(missing_ok=True)
            rows["create"].qemu.append(qemu_state.snapshot(counter, cmdline, mib, file, scratch) * 1000)
            apparent, disk = _sizes(file)
            rows["apparent"].qemu.append(apparent)
            rows["disk"].qemu.append(disk)
            rows["restore"].qemu.append(qemu_state.restore(counter, cmdline, mib, file, scratch) * 1000)
            progress(f"snapshots, {mib} MiB guest: {index + 1}/{plan.repetitions}")
        metrics += rows.values()
    return metrics


def _wait_listening(destination: WatchedProcess, address: Path) -> None:
    deadline = time.monotonic() + 30
    while not address.exists():
        if destination.process.poll() is not None or time.monotonic() > deadline:
            raise HostError(f"kvmpy run --incoming never listened on {address}")
        time.sleep(0.005)


def kvmpy_migration(guest: Path, cmdline: str, memory_mib: int, ticks: int, scratch: Path) -> dict[str, Any]:
    """One migration between two kvmpy processes; the sender's report."""
    address = scratch / "kvmpy-migration.sock"
    address.unlink(missing_ok=True)
    destination = WatchedProcess(
        [sys.executable, "-m", "kvmpy", "run", "--incoming", f"unix:{address}"], "kvmpy run --incoming"
    )
    try:
        _wait_listening(destination, address)
        report = _driver("migrate", "--kernel", str(guest), "--cmdline", cmdline, "--ticks", str(ticks),
                         "--memory-mib", str(memory_mib), "--to", f"unix:{address}")  # fmt: skip
        destination.wait_for(TICK, 60)  # the guest runs on the destination
    finally:
        destination.stop()
        address.unlink(missing_ok=True)
    return report


def _migration_rows(label: str, key: str) -> dict[str, Metric]:
    return {
        "total": Metric(f"migration_total_{key}", f"Live migration total time, {label}", "ms", WHERE,
                        target=Target(ratio=1.0)),
        "downtime": Metric(f"migration_downtime_{key}", f"Live migration downtime, {label}", "ms", WHERE,
                           target=Target(ratio=1.0),
                           note="last guest instruction on the source to the first on the destination: "
                           "kvmpy's sender report, QEMU's STOP and RESUME events; both with a 300 ms budget"),
        "rounds": Metric(f"migration_rounds_{key}", f"Live migration rounds, {label}", "rounds", WHERE,
                         note="kvmpy: memory rounds; QEMU: dirty-bitmap syncs (dirty-sync-count)"),
        "bytes": Metric(f"migration_bytes_{key}", f"Live migration data sent, {label}", "MiB", WHERE),
    }  # fmt: skip


def migration_metrics(plan: StatePlan, progress: Progress, scratch: Path, khz: int) -> list[Metric]:
    guests = [
        (
            f"idle counter guest, {plan.migration_mib} MiB",
            "idle",
            guest_path("counter"),
            _counter_cmdline(khz),
            3,
        ),
        (
            f"guest writing {plan.dirty_rate_mib} MiB/s over {plan.dirty_span_mib}/{plan.migration_mib} MiB",
            "dirty",
            guest_path("dirty"),
            f"rate={plan.dirty_rate_mib} mib={plan.dirty_span_mib} tsc_khz={khz}",
            plan.dirty_ticks,
        ),
    ]
    metrics: list[Metric] = []
    for label, key, guest, cmdline, ticks in guests:
        rows = _migration_rows(label, key)
        for index in range(plan.repetitions):
            report = kvmpy_migration(guest, cmdline, plan.migration_mib, ticks, scratch)
            downtime = report.get("downtime_seconds")
            rows["total"].kvmpy.append(float(report["total_seconds"]) * 1000)
            if downtime is not None:
                rows["downtime"].kvmpy.append(float(downtime) * 1000)
            rows["rounds"].kvmpy.append(float(report["rounds"]))
            rows["bytes"].kvmpy.append(float(report["bytes_sent"]) / (1 << 20))
            theirs = qemu_state.migrate(guest, cmdline, plan.migration_mib, scratch, ticks)
            rows["total"].qemu.append(theirs.total_seconds * 1000)
            rows["downtime"].qemu.append(theirs.downtime_seconds * 1000)
            rows["rounds"].qemu.append(float(theirs.rounds))
            rows["bytes"].qemu.append(theirs.bytes_sent / (1 << 20))
            progress(f"live migration, {key} guest: {index + 1}/{plan.repetitions}")
        rows["downtime"].note += _budget_verdict(rows["downtime"])
        metrics += rows.values()
    return metrics


def _budget_verdict(downtime: Metric) -> str:
    """Issue 12's second downtime target, beside the ratio to QEMU: within the budget or not."""
    median = downtime.kvmpy_median
    if median is None:
        return ""
    within = "within" if median <= qemu_state.DOWNTIME_MS else "**over**"
    return f"; kvmpy's median ({median:.0f} ms) is {within} the {qemu_state.DOWNTIME_MS} ms budget"


def state_profiles(missed: set[str]) -> list[str]:
    """py-spy profiles of the kvmpy processes behind the missed snapshot and migration targets."""
    from kvmpy.bench.profile import profile_command

    sections: list[str] = []
    khz = tsc_khz()
    counter = guest_path("counter")
    driver = [sys.executable, "-m", "kvmpy.bench.vmm_driver"]
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-profile-") as scratch:
        directory = Path(scratch) / "snapshot"
        directory.mkdir()
        make = ["snapshot", "--kernel", str(counter), "--cmdline", _counter_cmdline(khz),
                "--memory-mib", "1024", "--out", str(directory)]  # fmt: skip
        what = "the benchmark's VMM driver (bench/vmm_driver.py)"
        if any(key.startswith("snapshot_create") for key in missed):
            title = "snapshot create, 1 GiB counter guest (the whole process: boot, ticks, CreateSnapshot)"
            sections.append(profile_command(driver + make, title, what=what))
        else:
            _driver(*make)
        if any(key.startswith(("snapshot_load", "restore_to_tick")) for key in missed):
            title = "LoadSnapshot in a fresh VMM, 1 GiB counter guest (the whole process)"
            sections.append(profile_command(driver + ["load", "--out", str(directory)], title, what=what))
        if any(key.startswith("migration_") for key in missed):
            address = Path(scratch) / "profile-migration.sock"
            destination = WatchedProcess(
                [sys.executable, "-m", "kvmpy", "run", "--incoming", f"unix:{address}"],
                "kvmpy run --incoming",
            )
            try:
                _wait_listening(destination, address)
                source = driver + ["migrate", "--kernel", str(counter), "--cmdline", _counter_cmdline(khz),
                                   "--to", f"unix:{address}"]  # fmt: skip
                title = "live migration source, idle counter guest, 256 MiB (the whole process)"
                sections.append(profile_command(source, title, what=what))
            finally:
                destination.stop()
    return sections


def run_state_suite(plan: StatePlan, progress: Progress) -> list[Metric]:
    khz = tsc_khz()
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-state-") as scratch:
        metrics = snapshot_metrics(plan, progress, Path(scratch), khz)
        metrics += migration_metrics(plan, progress, Path(scratch), khz)
    return metrics


__all__ = [
    "StatePlan",
    "kvmpy_migration",
    "migration_metrics",
    "run_state_suite",
    "snapshot_metrics",
    "state_profiles",
    "tsc_khz",
]
