"""The benchmark suite: figures, targets, the report, the lab plan, and a quick run against QEMU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.bench.lab import LabPlan, bench_lines, io_metrics, io_scenarios, paging_metrics, paging_scenarios
from kvmpy.bench.metric import Better, Metric, Target, per_unit
from kvmpy.bench.report import markdown_table, render
from kvmpy.lab.scenarios import ScenarioResult, _lab_failure
from kvmpy.pyspy import leaf_shares

ROOT = Path(__file__).resolve().parents[1]


def _metric(kvmpy: list[float], qemu: list[float], **kwargs: object) -> Metric:
    return Metric("k", "a figure", "µs", "here", kvmpy=kvmpy, qemu=qemu, **kwargs)  # type: ignore[arg-type]


def test_ratio_is_kvmpy_median_over_qemu_median() -> None:
    metric = _metric([1.0, 9.0, 3.0], [2.0, 2.0, 100.0])
    assert metric.kvmpy_median == 3.0 and metric.qemu_median == 2.0
    assert metric.ratio == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("better", "bound", "met"),
    [
        (Better.LOWER, 1.2, False),
        (Better.LOWER, 1.6, True),
        (Better.HIGHER, 1.0, True),
        (Better.HIGHER, 2.0, False),
    ],
)
def test_ratio_targets_follow_the_direction_of_better(better: Better, bound: float, met: bool) -> None:
    metric = _metric([3.0], [2.0], better=better, target=Target(ratio=bound))
    assert metric.met() is met


def test_absolute_target_and_missing_figures() -> None:
    assert _metric([30.0], [], target=Target(absolute=40)).met() is True
    assert _metric([50.0], [], target=Target(absolute=40)).met() is False
    assert _metric([], [], target=Target(ratio=1.0)).met() is None
    assert _metric([1.0], [1.0]).met() is None  # no target


def test_per_unit_subtracts_the_empty_run() -> None:
    assert per_unit([1.0, 2.0], [0.5, 1.0], 10) == pytest.approx([0.05, 0.1])
    with pytest.raises(ValueError):
        per_unit([1.0], [], 10)


def test_report_says_plainly_which_targets_are_missed() -> None:
    missed = _metric([3.0], [1.0], target=Target(ratio=1.2))
    met = Metric("m", "memory", "MiB", "here", kvmpy=[20.0], target=Target(absolute=40))
    table = markdown_table([missed, met], "2026-01-01")
    assert (
        "| a figure (µs, n=1) | 3.00 | 1.00 | 3.00× | ≤ 1.2× QEMU: **missed** | here | 2026-01-01 |" in table
    )
    assert "≤ 40 MiB: met" in table
    report = render([missed, met], title="t", preamble="p", plots=[], appendix="### Profile")
    assert "Targets missed: a figure (kvmpy 3 µs vs QEMU 1 µs, 3.00×)." in report
    assert report.rstrip().endswith("### Profile")


def test_profile_charges_imports_to_the_module_that_runs() -> None:
    raw = (
        "main (kvmpy/cli.py:1);_find_and_load (<frozen>:1);<module> (kvmpy/abi/x.py:3);"
        "_call_with_frames_removed (<frozen>:2) 30\n"
        "run (threading.py:1);Vcpu.run (kvmpy/kvm/vcpu.py:59) 70\n"
    )
    shares = dict(leaf_shares(raw))
    assert shares == {"Vcpu.run (kvmpy/kvm/vcpu.py:59)": 0.7, "<module> (kvmpy/abi/x.py:3)": 0.3}


def _result(name: str, output: str, status: int = 0) -> ScenarioResult:
    return ScenarioResult(name, status, 1, 1.0, 2.0, output)


def test_bench_lines_are_parsed_from_the_guest_console() -> None:
    output = (
        "noise\nBENCH blk-read mib=64 seconds=0.5 mbps=134.2\r\nBENCH tlb mib=256 reads=10 ns_each=9.5 (3)\n"
    )
    lines = bench_lines(_result("x", output))
    assert lines["blk-read"] == [{"mib": 64.0, "seconds": 0.5, "mbps": 134.2}]
    assert lines["tlb"][0]["ns_each"] == 9.5


def test_lab_plan_alternates_vmms_on_the_same_kernel_and_initrd() -> None:
    plan = LabPlan.full()
    scenarios = io_scenarios("/k", "/i", plan) + paging_scenarios("/k", "/i", plan)
    names = [s.name for s in scenarios]
    assert len(names) == len(set(names))
    assert names[:2] == ["boot-kvmpy-0", "boot-qemu-0"]
    assert {(s.kernel, s.initrd) for s in scenarios} == {("/k", "/i")}
    assert all(s.command.endswith("poweroff -f") for s in scenarios)
    assert f"-lt {plan.rounds}" in next(s for s in scenarios if s.name == "blk-qemu").command
    by_name = {s.name: s for s in scenarios}
    assert "--disk" in by_name["blk-kvmpy"].args and "-drive" in by_name["blk-qemu"].args
    assert by_name["blk-kvmpy"].command == by_name["blk-qemu"].command
    # the same host cache mode under both: page cache, then O_DIRECT (QEMU's cache=none)
    assert "cache=writeback" in " ".join(by_name["blk-qemu"].args)
    assert "cache=none" in " ".join(by_name["blk-direct-qemu"].args)
    assert "{direct}/bench.img,direct=on" in by_name["blk-direct-kvmpy"].args
    assert "vhost=off" in " ".join(by_name["net-qemu"].args)


def test_paging_metrics_put_both_modes_side_by_side() -> None:
    def results(factor: float) -> dict[str, ScenarioResult]:
        line = f"BENCH forkexec count=1 seconds=1 us_each={100 * factor}\n"
        return {f"paging-{vmm}": _result(f"paging-{vmm}", line) for vmm in ("kvmpy", "qemu")}

    metrics = {m.key: m for m in paging_metrics({"on": results(1), "off": results(3)})}
    assert metrics["forkexec_npt_on"].kvmpy == [100.0]
    rounds = {"paging-kvmpy": _result("paging-kvmpy", "BENCH tlb ns_each=5\nBENCH tlb ns_each=7\n")}
    assert paging_metrics({"on": rounds})[2].kvmpy == [5.0, 7.0]  # one sample per round
    assert metrics["forkexec_npt_off"].qemu == [300.0]
    assert metrics["tlb_npt_on"].kvmpy == []  # no line, no figure (and no crash)


def test_a_guest_that_hangs_costs_its_samples_not_the_run() -> None:
    plan = LabPlan.full()
    results = {
        s.name: _result(s.name, "BENCH blk-read mib=1 seconds=1 mbps=10\n")
        for s in io_scenarios("/k", "/i", plan)
    }
    results["boot-qemu-1"] = _result("boot-qemu-1", "evm: security.SM", status=-9)
    del results["net-kvmpy"]
    crashed = _result("blk-direct-kvmpy", "BENCH blk-read mbps=9\n", status=1)
    crashed.stderr = "kvmpy: vCPU 1: guest triple fault (KVM_EXIT_SHUTDOWN)\n"
    results["blk-direct-kvmpy"] = crashed
    metrics = {m.key: m for m in io_metrics(results, plan)}
    boot = metrics["boot_to_init"]
    assert len(boot.kvmpy) == plan.boots and len(boot.qemu) == plan.boots - 1
    assert "boot-qemu-1 did not finish (status -9" in boot.note and "security.SM" in boot.note
    assert metrics["blk-read"].kvmpy == [10.0] and metrics["blk-read"].qemu == [10.0]
    assert metrics["blk-read-direct"].qemu == [10.0] and "O_DIRECT" in metrics["blk-read-direct"].title
    assert "net-kvmpy never ran" in metrics["tcp-send"].note
    direct = metrics["blk-read-direct"]  # a run that stopped part-way keeps what its guest measured
    assert direct.kvmpy == [9.0] and "guest triple fault" in direct.note and "1 samples" in direct.note


def test_a_qemu_guest_that_reset_before_init_is_not_a_clean_run() -> None:
    """QEMU -no-reboot exits 0 after a guest triple fault: no init reached, no samples, a note."""
    plan = LabPlan.full()
    results = {s.name: _result(s.name, "BENCH tcp-send mbitps=300\n") for s in io_scenarios("/k", "/i", plan)}
    results["net-qemu"] = ScenarioResult("net-qemu", 0, 0, None, 15.0, "[ 5.9] pid_ma")
    retried = _result("net-kvmpy", "BENCH tcp-send mbitps=310\n")
    retried.notes = ["boot 40 s ended in a guest triple fault; booting again"]
    results["net-kvmpy"] = retried
    send = {m.key: m for m in io_metrics(results, plan)}["tcp-send"]
    assert send.kvmpy == [310.0] and send.qemu == []
    assert "net-qemu ended before the guest's init" in send.note
    assert "net-kvmpy: boot 40 s ended in a guest triple fault; booting again" in send.note


def test_lab_failures_worth_another_boot() -> None:
    def result(status: int | None, readies: int, stderr: str = "") -> ScenarioResult:
        return ScenarioResult("x", status, readies, None, 1.0, "", stderr)

    assert _lab_failure(result(0, 1)) is None
    assert _lab_failure(result(1, 1, "kvmpy: error: guest panicked")) is None
    assert "triple fault" in str(_lab_failure(result(1, 1, "kvmpy: vCPU 1: guest triple fault (X)")))
    assert "silent" in str(_lab_failure(result(-9, 1, "kvmpy.lab.scenarios: killed after 240 s")))
    assert "never reached its init" in str(_lab_failure(result(0, 0)))


def test_bench_rejects_bad_arguments_in_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "--repetitions", "zero"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "--repetitions: not a number: 'zero'" in done.stderr
    assert "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "--only", "exits,boats"], capture_output=True, text=True
    )
    assert done.returncode == 2 and "choose from exits,api,state,lab" in done.stderr


def test_kvmpy_overhead_is_its_figure_minus_the_python_floor_run_by_run() -> None:
    from kvmpy.bench.local import LocalPlan, _floor_metrics
    from kvmpy.bench.measure import Sample

    def samples(loop: str, *walls: float) -> list[Sample]:
        return [Sample(loop, w, None, w / 2, 0, 0, b"") for w in walls]  # CPU: half the wall time

    plan = LocalPlan(repetitions=2, exits=1000)
    loaded = {"python": samples("python", 0.05, 0.06), "c": samples("c", 0.03, 0.04)}
    empty = {"python": samples("python", 0.01, 0.01), "c": samples("c", 0.01, 0.01)}
    wall = _metric([45.0, 52.0], [30.0, 30.0])
    python, c, overhead = _floor_metrics("pio_storm", "Port I/O", "wall", plan, loaded, empty, wall)
    assert python.kvmpy == pytest.approx([40.0, 50.0]) and python.qemu == [] and "floor" in python.title
    assert c.kvmpy == pytest.approx([20.0, 30.0]) and "C" in c.title
    assert overhead.kvmpy == pytest.approx([5.0, 2.0]) and overhead.target == Target(absolute=3)
    cpu = _metric([21.0, 26.0], [15.0, 15.0])
    python, _, overhead = _floor_metrics("pio_storm", "Port I/O", "cpu", plan, loaded, empty, cpu)
    assert python.key == "pio_storm_floor_python_cpu" and python.kvmpy == pytest.approx([20.0, 25.0])
    assert overhead.key == "pio_storm_overhead_cpu" and overhead.kvmpy == pytest.approx([1.0, 1.0])


@pytest.mark.kvm
def test_floor_loops_take_exactly_the_guests_exits(guests: Path, tmp_path: Path) -> None:
    """The bare loops run the guest kvmpy set up to its debug exit: count=N costs N more exits."""
    from kvmpy.bench.floor_loop import run_loop
    from kvmpy.bench.floors import compile_c_loop

    library = compile_c_loop(tmp_path)
    for loop in ("python", "c"):
        results = [run_loop(loop, guests / "pio_storm.elf", f"count={n}", 64, library) for n in (0, 500)]
        assert all(status == 0 and seconds > 0 and cpu > 0 for status, seconds, cpu, _ in results), results
        assert results[1][3] - results[0][3] == 500 + 2, loop  # and "500" prints two characters more than "0"
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy.bench.floor_loop", "c", str(guests / "mmio_storm.elf"), "count=100",
         "--library", str(library)],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == 0


@pytest.mark.kvm
def test_the_dirty_guest_keeps_its_pace(guests: Path) -> None:
    """dirty.elf ticks every 100 ms of TSC time while it writes; without tsc_khz it refuses."""
    from kvmpy.bench.state_bench import tsc_khz
    from kvmpy.testing.process import kvmpy

    done = kvmpy("run", "--kernel", str(guests / "dirty.elf"), "--cmdline",
                 f"rate=64 mib=16 ticks=3 tsc_khz={tsc_khz()}", timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "dirty 64 MiB/s over 16 MiB" in done.stdout and "tick 3\n" in done.stdout
    refused = kvmpy("run", "--kernel", str(guests / "dirty.elf"), "--cmdline", "rate=1", timeout=60)
    assert refused.returncode == 2 and "needs tsc_khz=" in refused.stdout


def _row(report: str, title: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {title}"))
    return [cell.strip() for cell in line.split("|")[1:-1]]


def _number(cell: str) -> float:
    return float(cell.replace(",", ""))


def _qemu_and_kvm() -> None:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        pytest.skip("needs /dev/kvm")
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64 (run scripts/setup)")


@pytest.mark.kvm
def test_quick_bench_against_qemu_writes_the_report(tmp_path: Path) -> None:
    """The exits (with their floors) and API suites through the command; no timing thresholds:
    one paired difference on a loaded machine can come out at any size, even negative."""
    _qemu_and_kvm()
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "--quick", "--repetitions", "1", "--only", "exits,api",
         "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = (tmp_path / "benchmarks.md").read_text()
    for row in ("exit round trip, wall time per exit", "VMM resident memory", "first serial byte"):
        assert row in report
    assert "--only exits,api --out" in report  # the command that reproduces it
    records = {r["key"]: r for r in json.loads((tmp_path / "benchmarks.json").read_text())}
    for guest in ("pio_storm", "mmio_storm"):
        round_trip = records[f"{guest}_round_trip"]
        assert len(round_trip["kvmpy"]) == 1 and len(round_trip["qemu"]) == 1
        python, c = records[f"{guest}_floor_python"]["kvmpy"], records[f"{guest}_floor_c"]["kvmpy"]
        assert len(python) == 1 and len(c) == 1 and records[f"{guest}_floor_c"]["qemu"] == []
        overhead = records[f"{guest}_overhead"]
        assert overhead["kvmpy"][0] == pytest.approx(round_trip["kvmpy"][0] - python[0])
        assert overhead["target"] == {"ratio": None, "absolute": 3}
        cpu, python_cpu = (
            records[f"{guest}_cpu_per_exit"]["kvmpy"][0],
            records[f"{guest}_floor_python_cpu"]["kvmpy"][0],
        )
        assert records[f"{guest}_overhead_cpu"]["kvmpy"][0] == pytest.approx(cpu - python_cpu)
    ready = records["api_ready"]
    assert 0 < ready["kvmpy"][0] < 30_000 and 0 < ready["qemu"][0] < 30_000
    assert records["api_call"]["kvmpy"][0] > 0 and records["api_call"]["qemu"][0] > 0
    assert (ready["met"] is False) == ("Profile: API readiness" in report)  # a missed target has its profile
    assert not any(key.startswith(("snapshot", "migration")) for key in records)


@pytest.mark.kvm
def test_snapshot_and_migration_rows_against_qemu(tmp_path: Path) -> None:
    """One run of each state benchmark on small guests: sizes, times and migrations make sense."""
    from kvmpy.bench.state_bench import StatePlan, migration_metrics, snapshot_metrics, tsc_khz

    _qemu_and_kvm()
    plan = StatePlan(
        1, snapshot_sizes_mib=(64,), dirty_rate_mib=64, dirty_span_mib=16, dirty_ticks=3, migration_mib=64
    )
    khz = tsc_khz()
    records = {m.key: m for m in snapshot_metrics(plan, lambda _: None, tmp_path, khz)}
    records |= {m.key: m for m in migration_metrics(plan, lambda _: None, tmp_path, khz)}
    apparent, disk = records["snapshot_apparent_64"], records["snapshot_disk_64"]
    assert apparent.kvmpy[0] >= 64 and disk.kvmpy[0] < 16  # all of RAM, sparse on disk
    assert 0 < apparent.qemu[0] < 64  # QEMU's stream skips zero pages
    for key in ("snapshot_create_64", "restore_to_tick_64"):
        assert records[key].kvmpy[0] > 0 and records[key].qemu[0] > 0
    assert records["snapshot_load_64"].kvmpy[0] > 0 and records["snapshot_load_warm_64"].kvmpy[0] > 0
    for vmm in ("kvmpy", "qemu"):
        idle, dirty = (
            getattr(records["migration_bytes_idle"], vmm)[0],
            getattr(records["migration_bytes_dirty"], vmm)[0],
        )
        assert 0 < idle < dirty  # the dirty guest's pages travel, more than once
        assert getattr(records["migration_rounds_dirty"], vmm)[0] >= 2
        for key in ("idle", "dirty"):
            total = getattr(records[f"migration_total_{key}"], vmm)[0]
            # QEMU's total ends when its source says "completed"; its downtime ends at the
            # destination's RESUME, which may come after that on a busy host (seen: 18 ms
            # against 16): only kvmpy's downtime lies wholly inside its total.
            bound = total if vmm == "kvmpy" else total + 1000
            assert 0 <= getattr(records[f"migration_downtime_{key}"], vmm)[0] < bound


def test_report_only_rebuilds_the_report_from_saved_samples(tmp_path: Path) -> None:
    """--report-only re-renders benchmarks.md from benchmarks.json without running anything."""
    from kvmpy.bench.command import write_report
    from kvmpy.bench.local import LocalPlan
    from kvmpy.bench.metric import Metric, Target

    metric = Metric(
        "vmm_overhead", "VMM memory", "MiB", "this machine", kvmpy=[20.0, 22.0], target=Target(absolute=40)
    )
    write_report([metric], LocalPlan.full(), tmp_path, invocation="kvmpy bench --no-lab", quick=False)
    (tmp_path / "benchmarks.md").unlink()
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "--report-only", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "benchmarks.md").read_text()
    assert "| VMM memory (MiB, n=2) | 21.0 |" in report and "≤ 40 MiB: met" in report
    (tmp_path / "benchmarks.json").write_text("[{}]")
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "bench", "--report-only", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and "malformed record" in done.stderr and "Traceback" not in done.stderr


def test_vhost_lab_plan_pairs_each_vhost_back_end_with_qemus() -> None:
    from kvmpy.bench.vhost_bench import lab_metrics, lab_scenarios

    by_name = {s.name: s for s in lab_scenarios("/k", "/i", LabPlan.full())}
    assert "{tmp}/bench.img,backend=vhost-user" in by_name["vhost-blk-kvmpy"].args
    daemon_qemu = " ".join(by_name["vhost-blk-daemon-qemu"].args)
    assert "vhost-user-blk-pci" in daemon_qemu and "share=on" in daemon_qemu
    assert "qemu-storage-daemon" in by_name["vhost-blk-daemon-qemu"].prepare
    assert "vhost=on" in by_name["vhost-net-kvmpy"].args[1]
    assert "vhost=on" in " ".join(by_name["vhost-net-qemu"].args)
    assert by_name["vhost-blk-kvmpy"].command == by_name["vhost-blk-qemu"].command
    results = {name: _result(name, "BENCH blk-read mbps=20\nBENCH tcp-rr rtt_us=70\n") for name in by_name}
    results["vhost-blk-qemu"] = _result("vhost-blk-qemu", "BENCH blk-read mbps=10\n")
    metrics = {m.key: m for m in lab_metrics(results)}
    against_qemu = metrics["vhost_user_blk_read_vs_vhost_blk_qemu"]
    assert against_qemu.kvmpy == [20.0] and against_qemu.qemu == [10.0] and against_qemu.ratio == 2.0
    assert metrics["vhost_user_blk_read_vs_vhost_blk_daemon_qemu"].qemu == [20.0]
    assert metrics["vhost_net_tcp_rr"].kvmpy == [70.0] and metrics["vhost_net_tcp_rr"].met() is True
    assert "cid=44" in by_name["vhost-vsock-kvmpy"].args[1]
    assert "vhost-vsock-pci,guest-cid=45" in by_name["vhost-vsock-qemu"].args
    for vmm, rtt in (("kvmpy", 30), ("qemu", 20)):  # the host peer's lines come from the notes
        name = f"vhost-vsock-{vmm}"
        results[name] = _result(name, "VSOCK-ECHO connections=2\n")
        results[name].notes = [f"$ cat ...\nBENCH vsock-rr count=500 seconds=1 rtt_us={rtt}\n(exit 0)"]
    vsock = {m.key: m for m in lab_metrics(results)}["vhost_vsock_rr"]
    assert vsock.kvmpy == [30.0] and vsock.qemu == [20.0] and vsock.met() is False


def test_vhost_lab_plan_measures_queue_pair_scaling_against_qemu() -> None:
    from kvmpy.bench.vhost_bench import lab_scenarios, mq_metrics

    by_name = {s.name: s for s in lab_scenarios("/k", "/i", LabPlan.full())}
    assert "vhost=on,queues=2" in by_name["mq-vhost-kvmpy-2"].args[1]
    assert "vhost=off,queues=1" in by_name["mq-python-kvmpy-1"].args[1]
    qemu_two = " ".join(by_name["mq-vhost-qemu-2"].args)
    assert "vhost=on,queues=2" in qemu_two and "mq=on,vectors=6" in qemu_two
    assert "queues" not in " ".join(by_name["mq-vhost-qemu-1"].args)
    assert "multi_queue" in by_name["mq-vhost-qemu-2"].prepare
    assert "multi_queue" not in by_name["mq-vhost-qemu-1"].prepare
    assert "taskset -c $cpu" in by_name["mq-vhost-kvmpy-1"].command
    assert all(s.cpus == 2 for s in by_name.values())

    def sends(*rates: float) -> str:
        return "".join(f"BENCH tcp-send mib=32 seconds=1 mbitps={rate}\n" for rate in rates)

    results = {
        "mq-vhost-kvmpy-1": _result("mq-vhost-kvmpy-1", sends(100, 100, 90, 110)),
        "mq-vhost-kvmpy-2": _result("mq-vhost-kvmpy-2", sends(150, 150, 200, 100, 7)),  # 7: alone, left out
        "mq-vhost-qemu-1": _result("mq-vhost-qemu-1", sends(100, 100)),
        "mq-vhost-qemu-2": _result("mq-vhost-qemu-2", sends(200, 200)),
        "mq-python-kvmpy-1": _result("mq-python-kvmpy-1", sends(50, 50)),
        "mq-python-kvmpy-2": _result("mq-python-kvmpy-2", ""),
    }
    metrics = {m.key: m for m in mq_metrics(results)}
    two_pairs, scaling, python = (
        metrics[key] for key in ("vhost_net_mq_send_2_pairs", "vhost_net_mq_scaling", "python_net_mq_scaling")
    )
    assert two_pairs.kvmpy == [300.0, 300.0] and two_pairs.ratio == 0.75 and two_pairs.met() is False
    assert scaling.kvmpy == [1.5, 1.5] and scaling.qemu == [2.0]
    assert python.kvmpy == [] and "mq-python-kvmpy-2 gave no samples" in python.note


def test_vhost_lab_plan_shares_a_directory_through_virtiofsd_under_both_vmms() -> None:
    from kvmpy.bench.vhost_bench import fs_metrics, lab_scenarios

    by_name = {s.name: s for s in lab_scenarios("/k", "/i", LabPlan.full())}
    kvmpy_fs, qemu_fs = by_name["virtiofs-kvmpy"], by_name["virtiofs-qemu"]
    assert kvmpy_fs.command == qemu_fs.command and "mount -t virtiofs share /mnt" in kvmpy_fs.command
    assert "tag=share,path={tmp}/share" in kvmpy_fs.args[1]
    assert "/usr/lib/qemu/virtiofsd" in qemu_fs.prepare and "cache=auto" in qemu_fs.prepare
    assert "vhost-user-fs-pci,chardev=fs,tag=share" in qemu_fs.args and "share=on" in " ".join(qemu_fs.args)
    results = {
        "virtiofs-kvmpy": _result("virtiofs-kvmpy", "BENCH fs-read mib=32 seconds=1 mbps=50\n"),
        "virtiofs-qemu": _result("virtiofs-qemu", "BENCH fs-read mbps=40\nBENCH fs-meta opsps=9\n"),
    }
    metrics = {m.key: m for m in fs_metrics(results)}
    assert metrics["virtiofs_fs_read"].ratio == 1.25 and metrics["virtiofs_fs_read"].met() is True
    assert metrics["virtiofs_fs_meta"].kvmpy == [] and metrics["virtiofs_fs_meta"].qemu == [9.0]


def test_the_boot_plan_puts_kvmpy_beside_qemu_pc_and_microvm_with_and_without_quiet() -> None:
    from kvmpy.bench.boot_bench import BOOT_VMMS, boot_scenarios
    from kvmpy.lab.scenarios import Scenario, _qemu_command

    base = Scenario("", "/k", "/i", "", cpus=2, kernel_args="console=ttyS0")
    boots = boot_scenarios(base, 2)
    assert len(boots) == 2 * 2 * len(BOOT_VMMS) and all(s.count_exits for s in boots)
    by_name = {s.name: s for s in boots}
    assert by_name["boot-microvm-quiet-1"].kernel_args == "console=ttyS0 quiet"
    assert by_name["boot-kvmpy-0"].kernel_args == "console=ttyS0"
    machine = _qemu_command(by_name["boot-microvm-0"])
    assert machine[machine.index("-M") + 1] == "microvm"
    pc = _qemu_command(by_name["boot-qemu-quiet-0"])
    assert pc[pc.index("-M") + 1] == "pc"


def test_boot_rows_compare_kvmpy_with_each_peer_and_count_exits_by_reason() -> None:
    plan = LabPlan.full()
    results = {}
    for scenario in io_scenarios("/k", "/i", plan):
        result = _result(scenario.name, "")
        if scenario.name.startswith("boot-"):
            vmm = scenario.name.split("-")[1]
            result.ready_seconds = {"kvmpy": 30.0, "qemu": 40.0, "microvm": 25.0}[vmm]
            io = {"kvmpy": 4000, "qemu": 9000, "microvm": 3000}[vmm]
            result.exits = {"io": io, "mmio": 10} if "quiet" in scenario.name else {"io": io * 10, "mmio": 10}
        results[scenario.name] = result
    metrics = {m.key: m for m in io_metrics(results, plan)}
    assert metrics["boot_to_init"].ratio == pytest.approx(0.75) and metrics["boot_to_init"].met()
    microvm = metrics["boot_to_init_microvm"]
    assert microvm.ratio == pytest.approx(1.2) and not microvm.met()
    assert metrics["boot_exits_quiet"].kvmpy == [4010.0] * plan.boots
    assert metrics["boot_exits_microvm"].qemu == [30010.0] * plan.boots
    assert "kvmpy: io 40,000, mmio 10; QEMU microvm: io 30,000, mmio 10" in metrics["boot_exits_microvm"].note


def test_the_kernel_exit_histogram_is_read_by_reason() -> None:
    from kvmpy.lab.exit_trace import ExitCounter, ExitTraceError, parse_histogram

    text = (
        "# event histogram\n#\n# trigger info: hist:keys=reason:vals=hitcount:size=256 [active]\n#\n\n"
        "{ reason:          6 } hitcount:        123\n{ reason:          2 } hitcount:      45678\n"
        "{ reason:         99 } hitcount:          1\n\nTotals:\n    Hits: 45802\n"
    )
    assert parse_histogram(text) == {"mmio": 123, "io": 45678, "reason_99": 1}
    with pytest.raises(ExitTraceError, match="is the kvm module loaded"):
        ExitCounter(Path("/nonexistent/kvm_userspace_exit")).start()
