"""Benchmarks in the lab (real AMD SVM under QEMU TCG): stock Debian Linux under kvmpy and QEMU/KVM.

Both VMMs boot the same kernel and initramfs with the same command line, one
after the other, in one lab boot per paging mode. The guest side of each I/O
and memory workload is ``kvmpy-bench`` (guests/linux/kvmpy_bench.c), appended
to the default image's initramfs; it times itself with the guest's clock and
prints "BENCH key=value" lines.

Absolute figures in the lab are TCG's, many times slower than hardware; the
ratios between the two VMMs on the same emulated machine are what carry over.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

from kvmpy.bench.boot_bench import boot_metrics, boot_name, boot_scenarios
from kvmpy.bench.metric import Better, Metric, Target
from kvmpy.bench.profile import profile_table
from kvmpy.errors import HostError
from kvmpy.lab import cpio
from kvmpy.lab.debian import cache_dir
from kvmpy.lab.image import build_image
from kvmpy.lab.scenarios import Scenario, ScenarioResult, parse_results
from kvmpy.testing.guests import build_guests
from kvmpy.vmm.stats_report import device_exits

TOOL = "/bin/kvmpy-bench"
TAP = "kvmbench0"
HOST_ADDRESS, GUEST_ADDRESS = "10.0.3.1", "10.0.3.15"
MAC = "52:54:00:12:34:56"
DISK_MIB = 128
VMMS = ("kvmpy", "qemu")
Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class LabPlan:
    boots: int  # boot-time repetitions per VMM
    blk_mib: int
    random_reads: int
    net_mib: int
    round_trips: int
    console_kib: int
    forks: int
    maps: int
    tlb_reads: int
    #: Each workload runs this many times in one guest boot: that many samples per VMM.
    rounds: int = 3

    @classmethod
    def full(cls) -> LabPlan:
        return cls(
            boots=3,
            blk_mib=64,
            random_reads=2000,
            net_mib=32,
            round_trips=500,
            console_kib=8,
            forks=200,
            maps=40,
            tlb_reads=2_000_000,
        )


def bench_initrd(modules: list[str] | None = None, name: str = "") -> tuple[Path, Path]:
    """The default image's kernel, and its initramfs (with ``modules`` instead of the default
    ones, if given) with kvmpy-bench appended (a second archive)."""
    image = build_image(modules=modules)
    tool = build_guests() / "kvmpy-bench"
    extra = cpio.gzipped([cpio.regular(TOOL.lstrip("/"), tool.read_bytes(), executable=True)])
    initrd = cache_dir() / "bench" / f"initrd{'-' + name if name else ''}-with-kvmpy-bench.cpio.gz"
    initrd.parent.mkdir(parents=True, exist_ok=True)
    initrd.write_bytes(image.initrd.read_bytes() + extra)
    return image.kernel, initrd


#: The host side of the benchmark disk: through the lab's page cache, or with O_DIRECT.
DISK_MODES = ("cached", "direct")


def _disk_image(mode: str) -> str:
    return "{direct}/bench.img" if mode == "direct" else "{tmp}/bench.img"


def _disk_args(vmm: str, mode: str) -> tuple[str, ...]:
    """The same cache mode under both VMMs, no vhost: QEMU's writeback or none (O_DIRECT)."""
    disk = _disk_image(mode)
    if vmm == "qemu":
        cache = "none" if mode == "direct" else "writeback"
        return ("-drive", f"file={disk},if=virtio,format=raw,cache={cache},aio=threads")
    return ("--disk", f"{disk},direct=on" if mode == "direct" else disk)


def _net_args(vmm: str) -> tuple[str, ...]:
    if vmm == "qemu":
        return (
            "-netdev",
            f"tap,id=net0,ifname={TAP},script=no,downscript=no,vhost=off",
            "-device",
            f"virtio-net-pci,netdev=net0,mac={MAC}",
        )
    return ("--net", f"tap={TAP},mac={MAC},vhost=off")  # the Python back end, against QEMU's


def net_prepare(*, multi_queue: bool = False) -> str:
    """The lab's tap (a multi-queue one for several queue pairs) and the network peer."""
    peer = f"{sys.executable} -m kvmpy.bench.net_peer {HOST_ADDRESS}"
    mode = "vnet_hdr multi_queue" if multi_queue else "vnet_hdr"
    return (
        f"ip tuntap add dev {TAP} mode tap {mode} && ip addr add {HOST_ADDRESS}/24 dev {TAP} && "
        f"ip link set {TAP} up && ({peer} > {{tmp}}/peer.log 2>&1 & echo $! > {{tmp}}/peer.pid); sleep 1"
    )


def net_cleanup() -> str:
    return f"kill $(cat {{tmp}}/peer.pid); ip link del {TAP}"


def io_scenarios(kernel: str, initrd: str, plan: LabPlan) -> list[Scenario]:
    """Boot, block, network and console workloads under both VMMs, alternating."""
    # One more boot after a guest fails in the lab's way (see Scenario.retries), noted in the row.
    base = Scenario("", kernel, initrd, "", cpus=2, memory="512M", timeout=300.0, retries=1)
    scenarios = boot_scenarios(base, plan.boots)
    blk = workload_rounds(
        plan,
        f"{TOOL} blk-write /dev/vda {plan.blk_mib}; {TOOL} blk-read /dev/vda {plan.blk_mib}; "
        f"{TOOL} blk-randread /dev/vda {plan.random_reads}",
    )
    net = f"ip link set eth0 up && ip addr add {GUEST_ADDRESS}/24 dev eth0 && " + workload_rounds(
        plan,
        f"{TOOL} tcp-send {HOST_ADDRESS} 5001 {plan.net_mib}; "
        f"{TOOL} tcp-recv {HOST_ADDRESS} 5002 {plan.net_mib}; "
        f"{TOOL} tcp-rr {HOST_ADDRESS} 5003 {plan.round_trips}",
    )
    for vmm in VMMS:
        for mode in DISK_MODES:
            image = _disk_image(mode)
            scenarios.append(
                replace(
                    base,
                    name=f"blk-{vmm}" if mode == "cached" else f"blk-{mode}-{vmm}",
                    vmm=vmm,
                    command=blk,
                    args=_disk_args(vmm, mode),
                    prepare=f"dd if=/dev/urandom of={image} bs=1M count={DISK_MIB} 2>/dev/null",
                )
            )
        scenarios.append(
            replace(
                base,
                name=f"net-{vmm}",
                vmm=vmm,
                command=net,
                args=_net_args(vmm),
                prepare=net_prepare(),
                verify=net_cleanup(),
            )
        )
    # Where kvmpy's time goes, in runs of their own (py-spy's sampling would cost the measured ones).
    by_name = {s.name: s for s in scenarios}
    for what, part in (("boot-kvmpy-0", "boot"), ("blk-kvmpy", "workload"), ("net-kvmpy", "workload")):
        scenarios.append(replace(by_name[what], name=f"profile-{what.split('-')[0]}", profile=part))
    for device, console in (("serial", "ttyS0"), ("virtio", "hvc0")):
        scenarios.append(
            replace(
                base,
                name=f"console-{device}",
                command=f"{TOOL} console /dev/{console} {plan.console_kib}; poweroff -f",
                args=("--console", device, "--stats"),
                kernel_args=f"console={console} quiet",
            )
        )
    return scenarios


def paging_scenarios(kernel: str, initrd: str, plan: LabPlan) -> list[Scenario]:
    """Page-table-heavy and TLB-heavy workloads, under both VMMs (run once per paging mode)."""
    command = workload_rounds(
        plan, f"{TOOL} forkexec {plan.forks}; {TOOL} mmap {plan.maps} 16; {TOOL} tlb 256 {plan.tlb_reads}"
    )
    base = Scenario("", kernel, initrd, command, cpus=1, memory="768M", timeout=600.0, retries=1)
    return [replace(base, name=f"paging-{vmm}", vmm=vmm) for vmm in VMMS]


def workload_rounds(plan: LabPlan, workload: str) -> str:
    """The guest command: ``workload`` ``plan.rounds`` times, then power off."""
    return f"i=0; while [ $i -lt {plan.rounds} ]; do {workload}; i=$((i+1)); done; poweroff -f"


def bench_lines(result: ScenarioResult) -> dict[str, list[dict[str, float]]]:
    """The guest's "BENCH name key=value ..." lines, by name, in the order printed."""
    found: dict[str, list[dict[str, float]]] = {}
    for match in re.finditer(r"BENCH (\S+)((?: \w+=[\d.]+)+)", result.output):
        values = dict(pair.split("=") for pair in match.group(2).split())
        found.setdefault(match.group(1), []).append({key: float(value) for key, value in values.items()})
    return found


#: A lab that prints no heartbeat for this long has hung (see kvmpy.lab.scenarios).
STALL_SECONDS = 180.0
ATTEMPTS = 2


def run_lab_batch(
    scenarios: list[Scenario], *, npt: bool, progress: Progress, batch: str = ""
) -> dict[str, ScenarioResult]:
    """Run ``scenarios`` in one lab boot (a second one for those left if the lab hangs or its
    kernel panics, as TCG's SVM makes it do now and then: docs/lab.md);
    ``batch`` names a batch whose logs are kept apart from the main one's."""
    from kvmpy.lab.runner import LabEndedError, LabStalledError, run_in_lab

    results: dict[str, ScenarioResult] = {}
    prefix = f"{batch}-" if batch else ""
    for stale in _logs(npt, batch):
        stale.unlink()
    for attempt in range(ATTEMPTS):
        remaining = [s for s in scenarios if s.name not in results]
        if not remaining:
            break
        specs = cache_dir() / "bench" / f"scenarios-{prefix}npt{int(npt)}.json"
        specs.write_text(json.dumps([asdict(s) for s in remaining]))
        log = cache_dir() / "bench" / f"lab-{prefix}npt{int(npt)}-{attempt}.log"
        progress(f"lab (npt={'on' if npt else 'off'}): {len(remaining)} guest boots, output in {log}")
        status: int | str
        with log.open("wb") as sink:
            try:
                status = run_in_lab(
                    [sys.executable, "-m", "kvmpy.lab.scenarios", str(specs)],
                    npt=npt,
                    cpus=2,
                    memory_mib=3072,
                    timeout=sum(s.timeout for s in remaining) + 300,
                    output=sink,
                    stall_seconds=STALL_SECONDS,
                )
            except (LabStalledError, LabEndedError) as error:  # a hung lab, or its kernel's panic
                status = str(error).splitlines()[0]
                progress(f"lab: {status}; booting it again for the rest")
        results.update(parse_results(log.read_text("utf-8", "replace")))
        if status == 0:
            break
    if not results:
        raise HostError(f"the lab benchmark batch failed; see {cache_dir() / 'bench'}")
    return results


def _logs(npt: bool, batch: str = "") -> list[Path]:
    """The guest output of the last lab batch in this paging mode, one file per lab boot."""
    prefix = f"{batch}-" if batch else ""
    return sorted((cache_dir() / "bench").glob(f"lab-{prefix}npt{int(npt)}-*.log"))


def results_from_logs(npt: bool) -> dict[str, ScenarioResult]:
    """The last lab batch's results, read back from its logs (later lab boots win)."""
    results: dict[str, ScenarioResult] = {}
    for log in _logs(npt):
        results.update(parse_results(log.read_text("utf-8", "replace")))
    return results


def _finished(results: dict[str, ScenarioResult], name: str, metric: Metric) -> ScenarioResult | None:
    """The run ``name`` if it ended cleanly; otherwise None, and the metric's note says why.

    One guest that hangs in the emulated lab (seen under both VMMs) costs its own
    samples, not the whole run's.
    """
    result = results.get(name)
    if result is not None and _clean(result):
        _note_retries(metric, name, result)
        return result
    _add_note(metric, f"{_failure(name, result)}: left out")
    return None


def _clean(result: ScenarioResult) -> bool:
    """The guest reached its init and the VMM ended with status 0."""
    return result.status == 0 and result.readies > 0


def _note_retries(metric: Metric, name: str, result: ScenarioResult) -> None:
    """A run that needed another boot (``Scenario.retries``) says so in the metric's note."""
    for note in result.notes:
        if note.endswith("booting again"):
            _add_note(metric, f"{name}: {note}")


def _failure(name: str, result: ScenarioResult | None) -> str:
    """Why run ``name`` did not end cleanly, in a few words."""
    if result is None:
        return f"{name} never ran"
    vmm_says = [line for line in result.stderr.splitlines() if line.startswith("kvmpy: ")]
    if vmm_says:
        return f"{name} stopped with status {result.status} ({vmm_says[0][7:][:70]})"
    if result.readies == 0 and result.status == 0:
        return f"{name} ended before the guest's init (a QEMU guest's triple fault ends QEMU quietly)"
    tail = (result.output.strip().splitlines() or ["(no output)"])[-1].strip()
    return f"{name} did not finish (status {result.status}, last console line {tail[:60]!r})"


def _add_note(metric: Metric, note: str) -> None:
    metric.note = "; ".join(filter(None, [metric.note, note]))


def add_bench_value(
    metric: Metric, vmm: str, results: dict[str, ScenarioResult], name: str, line: str, key: str
) -> None:
    """Add ``key`` of each of the guest's "BENCH ``line``" in run ``name`` to ``vmm``'s samples.

    A run that failed part-way keeps the samples its guest printed before (each is timed on
    its own by the guest); the metric's note says what happened.
    """
    result = results.get(name)
    lines = bench_lines(result).get(line, []) if result is not None else []
    samples = [values[key] for values in lines if key in values]
    getattr(metric, vmm).extend(samples)
    if result is not None:
        _note_retries(metric, name, result)
    if result is None or not _clean(result):
        kept = f"the {len(samples)} samples before that kept" if samples else "left out"
        _add_note(metric, f"{_failure(name, result)}: {kept}")


WHERE = "lab (SVM, npt=on)"


def io_metrics(results: dict[str, ScenarioResult], plan: LabPlan) -> list[Metric]:
    off = Metric("boot_to_poweroff", "Linux boot to poweroff, VMM exit (smp2; peer: QEMU pc)", "s", WHERE)
    for vmm in VMMS:
        for index in range(plan.boots):
            result = results.get(boot_name(vmm, "", index))
            if result is not None and _clean(result):
                getattr(off, vmm).append(result.wall_seconds)
    metrics = [*boot_metrics(results, WHERE, _finished), off]
    net = "net"
    rows = [
        *_blk_rows("blk", "host page cache", ""),
        *_blk_rows("blk-direct", "host O_DIRECT", "-direct"),
        _Row(net, "tcp-send", "mbitps", "virtio-net TCP guest → host", "Mbit/s", Target(ratio=0.8)),
        _Row(net, "tcp-recv", "mbitps", "virtio-net TCP host → guest", "Mbit/s", Target(ratio=0.8)),
        _Row(net, "tcp-rr", "rtt_us", "virtio-net TCP 1-byte round trip", "µs", None),
    ]
    for row in rows:
        better = Better.LOWER if row.unit == "µs" else Better.HIGHER
        metric = Metric(row.line + row.suffix, row.title, row.unit, WHERE, better=better, target=row.target)
        for vmm in VMMS:
            add_bench_value(metric, vmm, results, f"{row.scenario}-{vmm}", row.line, row.key)
        metrics.append(metric)
    metrics += _console_metrics(results, plan)
    return metrics


class _Row(NamedTuple):
    """One figure the guest's kvmpy-bench prints: in which runs, which BENCH line and key."""

    scenario: str
    line: str
    key: str
    title: str
    unit: str
    target: Target | None
    suffix: str = ""  # added to the metric's name (one BENCH line, several host set-ups)


def _blk_rows(scenario: str, host: str, suffix: str) -> list[_Row]:
    """The three virtio-blk figures of one host cache mode (the guest always uses O_DIRECT)."""
    same = Target(ratio=1.0)
    return [
        _Row(scenario, "blk-read", "mbps", f"virtio-blk sequential read 1 MiB, {host}", "MB/s", same, suffix),
        _Row(
            scenario, "blk-write", "mbps", f"virtio-blk sequential write 1 MiB, {host}", "MB/s", same, suffix
        ),
        _Row(
            scenario,
            "blk-randread",
            "iops",
            f"virtio-blk 4 KiB random read QD1, {host}",
            "IOPS",
            same,
            suffix,
        ),
    ]


def _console_metrics(results: dict[str, ScenarioResult], plan: LabPlan) -> list[Metric]:
    """Exits per KiB: the device's register accesses that exited to kvmpy, from --stats (a THR
    write waits in KVM's coalesced ring; a virtio kick ends in an ioeventfd), and the guest-timed
    throughput."""
    metrics = []
    devices = (
        ("serial", "16550A serial (ttyS0)", "serial (COM1)"),
        ("virtio", "virtio-console (hvc0)", "virtio-console"),
    )
    for device, label, rows in devices:
        per_kib = Metric(
            f"console_{device}_exits",
            f"{label}: exits per KiB written",
            "exits/KiB",
            WHERE,
            better=Better.LOWER,
        )
        per_kib.note = "kvmpy only; the device's exits over the whole quiet boot and the write"
        speed = Metric(
            f"console_{device}_speed", f"{label}: throughput", "KiB/s", WHERE, better=Better.HIGHER
        )
        result = _finished(results, f"console-{device}", per_kib)
        if result is None:
            metrics += [per_kib, speed]
            continue
        line = next(iter(bench_lines(result).get("console", [])), {})
        exits = device_exits(result.stderr, rows)
        if exits:
            per_kib.kvmpy.append(exits / plan.console_kib)
        if "kibps" in line:
            speed.kvmpy.append(line["kibps"])
        metrics += [per_kib, speed]
    return metrics


def paging_metrics(by_mode: dict[str, dict[str, ScenarioResult]]) -> list[Metric]:
    rows = [
        ("forkexec", "us_each", "fork + exec + wait", "µs"),
        ("mmap", "us_each", "mmap 16 MiB, touch, munmap", "µs"),
        ("tlb", "ns_each", "random dependent read over 256 MiB", "ns"),
    ]
    metrics = []
    for mode, results in by_mode.items():
        where = f"lab (SVM, npt={mode})"
        paging = "nested paging" if mode == "on" else "shadow paging"
        for line, key, title, unit in rows:
            metric = Metric(f"{line}_npt_{mode}", f"{title}, {paging}", unit, where)
            for vmm in VMMS:
                add_bench_value(metric, vmm, results, f"paging-{vmm}", line, key)
            metrics.append(metric)
    return metrics


def run_lab_suite(plan: LabPlan, progress: Progress) -> tuple[list[Metric], str]:
    """The lab figures, and the Markdown profiles of where kvmpy's time went there."""
    kernel, initrd = bench_initrd()
    io = io_scenarios(str(kernel), str(initrd), plan)
    paging = paging_scenarios(str(kernel), str(initrd), plan)
    with_npt = run_lab_batch(io + paging, npt=True, progress=progress)
    without_npt = run_lab_batch(paging, npt=False, progress=progress)
    return lab_metrics(with_npt, without_npt, plan), lab_runs() + lab_profiles(with_npt)


def lab_runs() -> str:
    """A note on batches that needed a second lab boot (the first one hung)."""
    lines = []
    for npt in (True, False):
        boots = len(_logs(npt))
        if boots > 1:
            lines.append(
                f"- The npt={'on' if npt else 'off'} batch took {boots} lab boots: the lab kernel hung"
                " (no heartbeat for three minutes, see docs/lab.md) and the scenarios it had not"
                " finished ran in a fresh lab, so some rows compare runs from different lab boots."
            )
    return "### Lab runs\n\n" + "\n".join(lines) + "\n\n" if lines else ""


def lab_suite_from_logs(plan: LabPlan) -> tuple[list[Metric], str]:
    """:func:`run_lab_suite`'s figures and profiles, recomputed from the last run's logs."""
    with_npt, without_npt = results_from_logs(True), results_from_logs(False)
    if not with_npt:
        raise HostError(f"no lab benchmark logs in {cache_dir() / 'bench'}: run kvmpy bench first")
    return lab_metrics(with_npt, without_npt, plan), lab_runs() + lab_profiles(with_npt)


PROFILE_TITLES = {
    "profile-boot": "Linux boot to poweroff in the lab (smp2), whole run",
    "profile-blk": "the virtio-blk workload in the lab, from the guest's init on",
    "profile-net": "the virtio-net workload in the lab, from the guest's init on",
}


def lab_profiles(results: dict[str, ScenarioResult]) -> str:
    """py-spy tables of the profiling runs (kvmpy under py-spy inside the lab)."""
    sections = []
    for name, title in PROFILE_TITLES.items():
        result = results.get(name)
        if result is None:
            continue
        if result.status != 0:
            sections.append(f"### Profile: {title}\n\nThe profiled run failed (status {result.status}).\n")
        else:
            sections.append(profile_table(title, result.profile))
    return "\n".join(sections)


def lab_metrics(
    with_npt: dict[str, ScenarioResult], without_npt: dict[str, ScenarioResult], plan: LabPlan
) -> list[Metric]:
    """The figures of the two lab batches (nested paging with everything, shadow paging)."""
    metrics = io_metrics({k: v for k, v in with_npt.items() if not k.startswith("paging-")}, plan)
    paging_results = {
        "on": {k: v for k, v in with_npt.items() if k.startswith("paging-")},
        "off": without_npt,
    }
    return metrics + paging_metrics(paging_results)


__all__ = [
    "LabPlan",
    "bench_initrd",
    "bench_lines",
    "lab_metrics",
    "lab_profiles",
    "lab_suite_from_logs",
    "results_from_logs",
    "run_lab_suite",
]
