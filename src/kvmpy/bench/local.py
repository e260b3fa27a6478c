"""Benchmarks on this machine's KVM: kvmpy and QEMU alternate on the same test-guest ELFs.

Each figure is a median over repetitions. Per-exit costs come from paired runs:
the same guest with N accesses and with none, so VMM start-up and guest set-up
cancel out and what remains is N exit round trips.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kvmpy.bench.floors import LOOPS, FloorLoops
from kvmpy.bench.measure import JAILED, Sample, run
from kvmpy.bench.metric import Metric, Target, per_unit
from kvmpy.errors import HostError
from kvmpy.testing.guests import guest_path

WHERE = "this machine"
VMMS = ("kvmpy", "qemu")
MEMTOUCH_MIB = 64
GUEST_RAM_MIB = 256


@dataclass(frozen=True, slots=True)
class LocalPlan:
    repetitions: int
    exits: int  # guest accesses per storm run

    @classmethod
    def quick(cls) -> LocalPlan:
        return cls(repetitions=3, exits=4000)

    @classmethod
    def full(cls) -> LocalPlan:
        return cls(repetitions=9, exits=20000)


Progress = Callable[[str], None]


def _checked(sample: Sample, guest: str) -> Sample:
    if sample.status != 0:
        tail = sample.output.decode("utf-8", "replace").strip().splitlines()[-3:]
        raise HostError(f"{sample.vmm} ran the {guest} guest with status {sample.status}: {tail}")
    return sample


def _alternate(
    guest: str,
    cmdline: str,
    repetitions: int,
    progress: Progress,
    floors: FloorLoops | None = None,
    vmms: tuple[str, ...] = VMMS,
) -> dict[str, list[Sample]]:
    """Run ``guest`` under each VMM in turn (and the floor loops, if given), ``repetitions`` times."""
    path = guest_path(guest)
    samples: dict[str, list[Sample]] = {vmm: [] for vmm in vmms}
    for index in range(repetitions):
        for vmm in vmms:
            samples[vmm].append(_checked(run(vmm, path, cmdline, GUEST_RAM_MIB), guest))
        if floors is not None:
            for loop in LOOPS:
                samples.setdefault(loop, []).append(floors.run(loop, path, cmdline, GUEST_RAM_MIB))
        progress(f"{guest} {cmdline or '(no arguments)'}: {index + 1}/{repetitions}")
    return samples


def _start_metrics(plan: LocalPlan, progress: Progress) -> list[Metric]:
    samples = _alternate("hello", "", plan.repetitions, progress)
    first = Metric(
        "start_to_first_output",
        "VMM start to the guest's first serial byte (hello guest)",
        "ms",
        WHERE,
        target=Target(ratio=1.0),
        note="stands in for 'first guest instruction': the guest's first act is to print",
    )
    whole = Metric("start_to_exit", "VMM start to guest exit (hello guest)", "ms", WHERE)
    for vmm in VMMS:
        first_outputs = [s.first_output * 1000 for s in samples[vmm] if s.first_output is not None]
        getattr(first, vmm).extend(first_outputs)
        getattr(whole, vmm).extend(s.wall * 1000 for s in samples[vmm])
    return [first, whole]


def _storm_metrics(
    guest: str, label: str, extra: str, plan: LocalPlan, progress: Progress, floors: FloorLoops | None = None
) -> list[Metric]:
    loaded = _alternate(guest, f"count={plan.exits} {extra}".strip(), plan.repetitions, progress, floors)
    empty = _alternate(guest, f"count=0 {extra}".strip(), plan.repetitions, progress, floors)
    wall = Metric(
        f"{guest}_round_trip",
        f"{label} exit round trip, wall time per exit",
        "µs",
        WHERE,
        target=Target(ratio=1.2),
    )
    cpu = Metric(
        f"{guest}_cpu_per_exit",
        f"{label} exit, VMM CPU time per exit (user + system)",
        "µs",
        WHERE,
    )
    for vmm in VMMS:
        walls = per_unit([s.wall for s in loaded[vmm]], [s.wall for s in empty[vmm]], plan.exits)
        cpus = per_unit([s.cpu for s in loaded[vmm]], [s.cpu for s in empty[vmm]], plan.exits)
        getattr(wall, vmm).extend(w * 1e6 for w in walls)
        getattr(cpu, vmm).extend(c * 1e6 for c in cpus)
    if floors is None:
        return [wall, cpu]
    wall_floors = _floor_metrics(guest, f"{label} exit round trip", "wall", plan, loaded, empty, wall)
    cpu_floors = _floor_metrics(guest, f"{label} exit, CPU time per exit", "cpu", plan, loaded, empty, cpu)
    return [wall, *wall_floors, cpu, *cpu_floors]


_OVERHEAD_NOTES = {
    "wall": "kvmpy's wall time per exit minus the bare Python loop's, repetition by repetition (each a "
    "difference of paired runs: on a loaded machine the noise can exceed it, and make it negative)",
    "cpu": "kvmpy's CPU time per exit (user + system, the whole process) minus the bare Python loop's "
    "(its thread's), repetition by repetition: a loaded host's scheduling delays do not count in it",
}


def _floor_metrics(
    guest: str,
    label: str,
    kind: str,
    plan: LocalPlan,
    loaded: dict[str, list[Sample]],
    empty: dict[str, list[Sample]],
    kvmpy: Metric,
) -> list[Metric]:
    """The floor rows beside ``kvmpy`` (its wall or CPU time per exit, as ``kind`` says) and
    kvmpy's overhead over the Python floor (issue 17)."""
    metrics = []
    per_exit: dict[str, list[float]] = {}
    for loop, name in LOOPS.items():
        loaded_times = [getattr(s, kind) for s in loaded[loop]]
        empty_times = [getattr(s, kind) for s in empty[loop]]
        per_exit[loop] = [t * 1e6 for t in per_unit(loaded_times, empty_times, plan.exits)]
        metric = Metric(
            f"{guest}_floor_{loop}" + ("_cpu" if kind == "cpu" else ""),
            f"{label}, floor: {name} on the same guest",
            "µs",
            WHERE,
            note="a floor, not kvmpy: the loop's figure is in the kvmpy column (bench/floor_loop.py)"
            + ("; the looping thread's CPU time, guest time included" if kind == "cpu" else ""),
        )
        metric.kvmpy.extend(per_exit[loop])
        metrics.append(metric)
    overhead = Metric(
        f"{guest}_overhead" + ("_cpu" if kind == "cpu" else ""),
        f"{label}, kvmpy's overhead over the Python floor",
        "µs",
        WHERE,
        target=Target(absolute=3),
        note=_OVERHEAD_NOTES[kind],
    )
    overhead.kvmpy.extend(k - f for k, f in zip(kvmpy.kvmpy, per_exit["python"], strict=True))
    metrics.append(overhead)
    return metrics


def _memory_metric(plan: LocalPlan, progress: Progress) -> Metric:
    samples = _alternate("memtouch", f"mib={MEMTOUCH_MIB}", plan.repetitions, progress)
    metric = Metric(
        "vmm_overhead",
        f"VMM resident memory minus the {MEMTOUCH_MIB} MiB the guest touched",
        "MiB",
        WHERE,
        target=Target(absolute=40),
        note="peak RSS of the VMM process (getrusage), guest RAM 256 MiB",
    )
    for vmm in VMMS:
        getattr(metric, vmm).extend(s.max_rss / (1 << 20) - MEMTOUCH_MIB for s in samples[vmm])
    return metric


def _jail_metrics(plan: LocalPlan, progress: Progress) -> list[Metric]:
    """What the jail costs (issue 14): start-up, and the port I/O exit that passes the vCPU's
    seccomp filter each time, jailed against unjailed kvmpy in the same run, QEMU beside."""
    vmms = ("kvmpy", JAILED, "qemu")
    hello = _alternate("hello", "", plan.repetitions, progress, vmms=vmms)
    start = Metric(
        "jailed_start_to_first_output",
        "VMM start to the guest's first serial byte, kvmpy jailed (kvmpy run --jail)",
        "ms",
        WHERE,
        note="seccomp, Landlock, namespaces, pivot_root, uid 4242; the guest file bound into the jail",
    )
    setup = Metric(
        "jail_setup", "What the jail adds to start-up (jailed minus unjailed, paired)", "ms", WHERE
    )
    for jailed, plain in zip(hello[JAILED], hello["kvmpy"], strict=True):
        if jailed.first_output is not None and plain.first_output is not None:
            start.kvmpy.append(jailed.first_output * 1000)
            setup.kvmpy.append((jailed.first_output - plain.first_output) * 1000)
    start.qemu.extend(s.first_output * 1000 for s in hello["qemu"] if s.first_output is not None)
    loaded = _alternate("pio_storm", f"count={plan.exits}", plan.repetitions, progress, vmms=vmms)
    empty = _alternate("pio_storm", "count=0", plan.repetitions, progress, vmms=vmms)
    per_exit = {
        vmm: [
            w * 1e6 for w in per_unit([s.wall for s in loaded[vmm]], [s.wall for s in empty[vmm]], plan.exits)
        ]
        for vmm in vmms
    }
    jailed_exit = Metric(
        "pio_storm_round_trip_jailed",
        "Port I/O exit round trip, kvmpy jailed (every exit passes the vCPU's seccomp filter)",
        "µs",
        WHERE,
        kvmpy=per_exit[JAILED],
        qemu=per_exit["qemu"],
    )
    seccomp = Metric(
        "seccomp_per_exit",
        "What the jail adds to a port I/O exit round trip (jailed minus unjailed, paired)",
        "µs",
        WHERE,
        kvmpy=[j - p for j, p in zip(per_exit[JAILED], per_exit["kvmpy"], strict=True)],
        note="differences of paired runs: on a loaded machine the noise can exceed it",
    )
    return [start, setup, jailed_exit, seccomp]


#: The rate-limited disk: blk_records makes three requests a record (write, read back, read the
#: previous record again) as fast as they complete, against a limit of this many a second.
LIMITED_OPS, LIMITED_RECORDS = 300, 300


def _rate_limit_metric(plan: LocalPlan, progress: Progress) -> Metric:
    """Issue 13: a disk limited with ``ops=N`` holds its rate (Firecracker's token bucket)."""
    metric = Metric(
        "limited_disk_rate",
        f"virtio-blk with --disk ...,ops={LIMITED_OPS}: requests per second reached, over the limit",
        "×",
        WHERE,
        target=Target(absolute=1.05),
        note=f"blk_records, {LIMITED_RECORDS} records (3 requests each) as fast as the limit lets them; "
        "the first second's bucket is spent at once and left out: (requests - bucket) / (wall - start)",
    )
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-") as scratch:
        image = Path(scratch) / "disk.img"
        image.write_bytes(bytes(1 << 20))
        for index in range(plan.repetitions):
            sample = _checked(
                run("kvmpy", guest_path("blk_records"), f"records={LIMITED_RECORDS} gap=0", GUEST_RAM_MIB,
                    ("--disk", f"{image},ops={LIMITED_OPS}")),
                "blk_records",
            )  # fmt: skip
            if sample.first_output is not None and sample.wall > sample.first_output:
                rate = (3 * LIMITED_RECORDS - LIMITED_OPS) / (sample.wall - sample.first_output)
                metric.kvmpy.append(rate / LIMITED_OPS)
            progress(f"limited disk: {index + 1}/{plan.repetitions}")
    return metric


def run_local_suite(plan: LocalPlan, progress: Progress, floors: FloorLoops | None = None) -> list[Metric]:
    """This machine's figures; with ``floors``, the bare-loop floors beside each exit round trip."""
    metrics = _start_metrics(plan, progress)
    metrics += _storm_metrics("pio_storm", "Port I/O (OUT to 0x80)", "", plan, progress, floors)
    metrics += _storm_metrics("mmio_storm", "MMIO (4-byte write, unassigned)", "", plan, progress, floors)
    metrics.append(_memory_metric(plan, progress))
    metrics.append(_rate_limit_metric(plan, progress))
    if os.geteuid() == 0:  # the jail is built as root
        metrics += _jail_metrics(plan, progress)
    return metrics


__all__ = ["LocalPlan", "run_local_suite"]
