"""``kvmpy bench``: run the suites, write the Markdown report, plots and raw samples."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpy.errors import HostError

if TYPE_CHECKING:  # the suites load only when the command runs: ``kvmpy run`` starts faster
    from kvmpy.bench.local import LocalPlan
    from kvmpy.bench.metric import Metric

PREAMBLE = """
kvmpy against QEMU/KVM on identical guests, measured in the same run, the two
VMMs alternating. Figures are medians over the runs (n in the metric column);
ratio is kvmpy's median over QEMU's. "This machine" rows run the test guests of
guests/ on the host's KVM (PVM here: every exit costs tens of microseconds,
whoever the VMM is); QEMU runs them on its microvm machine, which like kvmpy
boots a PVH kernel without firmware. "Lab" rows boot Debian's stock kernel with
the default image's initramfs inside the lab (QEMU TCG with AMD SVM and a real
KVM), QEMU on its default PC machine with SeaBIOS; absolute lab figures are
TCG's, the ratios are what carry over. Floor rows are no VMM: a bare KVM_RUN
loop in Python or C on the guest kvmpy set up, its figure in the kvmpy column;
kvmpy's overhead is its round trip minus the Python floor. Regenerate with
`{command}`.
"""


def _progress(message: str) -> None:
    print(f"kvmpy bench: {message}", file=sys.stderr, flush=True)


def _check_host() -> None:
    if shutil.which("qemu-system-x86_64") is None:
        raise HostError(
            "kvmpy bench compares with QEMU: qemu-system-x86_64 is not installed (run scripts/setup)"
        )
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        raise HostError("kvmpy bench needs read and write access to /dev/kvm")


def _profiles(metrics: list[Metric], plan: LocalPlan) -> str:
    """py-spy profiles for the targets kvmpy missed on this machine."""
    from kvmpy.bench.profile import profile_run
    from kvmpy.testing.guests import guest_path

    sections = []
    missed = {m.key for m in metrics if m.met() is False and not m.where.startswith("lab")}
    if missed & {"start_to_first_output"}:
        sections.append(profile_run(guest_path("hello"), "", "start-up (hello guest)"))
    for guest, title in (
        ("pio_storm", "port I/O exits (pio_storm)"),
        ("mmio_storm", "MMIO exits (mmio_storm)"),
    ):
        if missed & {f"{guest}_round_trip", f"{guest}_overhead", f"{guest}_overhead_cpu"}:
            sections.append(profile_run(guest_path(guest), f"count={plan.exits * 5}", title))
    if "api_ready" in missed:
        from kvmpy.bench.api_bench import api_profile

        sections.append(api_profile())
    if any(key.startswith(("snapshot_", "restore_", "migration_")) for key in missed):
        from kvmpy.bench.state_bench import state_profiles

        sections += state_profiles(missed)
    return "\n".join(sections)


def _bench(args: argparse.Namespace) -> int:
    from kvmpy.bench.api_bench import api_metrics
    from kvmpy.bench.floors import FloorLoops, compile_c_loop
    from kvmpy.bench.local import LocalPlan, run_local_suite
    from kvmpy.bench.report import load_average
    from kvmpy.bench.state_bench import StatePlan, run_state_suite
    from kvmpy.bytecode import compile_package

    if args.report_only:
        return _report_only(args)
    _check_host()
    compile_package()  # time kvmpy as installed, with its bytecode, not compiling at every start
    plan = LocalPlan.quick() if args.quick else LocalPlan.full()
    if args.repetitions:
        plan = LocalPlan(repetitions=args.repetitions, exits=plan.exits)
    started = time.monotonic()
    load_before = load_average()
    metrics: list[Metric] = []
    if "exits" in args.only:
        with tempfile.TemporaryDirectory(prefix="kvmpy-bench-") as scratch:
            floors = FloorLoops(compile_c_loop(Path(scratch)))
            metrics += run_local_suite(plan, _progress, floors)
    if "api" in args.only:
        metrics += api_metrics(plan.repetitions, _progress)
    if "state" in args.only:
        metrics += run_state_suite(StatePlan(plan.repetitions), _progress)
    if "vhost" in args.only:
        from kvmpy.bench.vhost_bench import run_vhost_suite

        with_lab = not args.quick and not args.no_lab
        metrics += run_vhost_suite(plan.repetitions, _progress, with_lab=with_lab)
    lab_appendix = ""
    if not args.quick and not args.no_lab and "lab" in args.only:
        from kvmpy.bench.lab import LabPlan, run_lab_suite

        lab, lab_appendix = run_lab_suite(LabPlan.full(), _progress)
        metrics += lab
    invocation = "kvmpy bench" + (" --quick" if args.quick else "") + (" --no-lab" if args.no_lab else "")
    if args.only != SUITES:
        invocation += " --only " + ",".join(args.only)
    # Other work on the host shows in every figure: say how busy it was.
    load = (
        f"Load average (1, 5, 15 min) at the start of the run: {load_before}; at its end: {load_average()}."
    )
    report = write_report(
        metrics, plan, args.out, invocation=invocation, quick=args.quick, lab_appendix=lab_appendix, load=load
    )
    _progress(f"done in {time.monotonic() - started:.0f} s: {args.out / 'benchmarks.md'}")
    print(report)
    return 0


def _report_only(args: argparse.Namespace) -> int:
    """Rebuild the report in ``--out`` from its samples and the last lab run's logs."""
    from kvmpy.bench.lab import LabPlan, lab_suite_from_logs
    from kvmpy.bench.local import LocalPlan

    samples = args.out / "benchmarks.json"
    try:
        records = json.loads(samples.read_text())
    except (OSError, ValueError) as error:
        raise HostError(f"cannot read {samples}: {error}") from None
    metrics = [_metric_from_record(r) for r in records if not str(r.get("where", "")).startswith("lab")]
    lab_appendix = ""
    if any(str(r.get("where", "")).startswith("lab") for r in records):
        lab, lab_appendix = lab_suite_from_logs(LabPlan.full())
        metrics += lab
    invocation = "kvmpy bench" if lab_appendix else "kvmpy bench --no-lab"
    provenance = (
        "### Provenance\n\nRebuilt by `kvmpy bench --report-only` from this directory's benchmarks.json"
        " and the lab logs of the last `kvmpy bench` run: the same samples, figures recomputed.\n"
    )
    lab_appendix = provenance + "\n" + lab_appendix
    plan = LocalPlan.full()
    write_report(metrics, plan, args.out, invocation=invocation, quick=False, lab_appendix=lab_appendix)
    _progress(f"rebuilt {args.out / 'benchmarks.md'} from {samples} and the lab logs")
    return 0


def _metric_from_record(record: dict[str, object]) -> Metric:
    from kvmpy.bench.metric import Better, Metric, Target

    target = record.get("target")
    try:
        return Metric(
            key=str(record["key"]),
            title=str(record["title"]),
            unit=str(record["unit"]),
            where=str(record["where"]),
            better=Better(record["better"]),
            kvmpy=[float(v) for v in record["kvmpy"]],  # type: ignore[attr-defined]
            qemu=[float(v) for v in record["qemu"]],  # type: ignore[attr-defined]
            target=Target(**target) if isinstance(target, dict) else None,
            note=str(record.get("note", "")),
        )
    except (KeyError, TypeError, ValueError) as error:
        raise HostError(f"benchmarks.json has a malformed record: {error}") from None


def write_report(
    metrics: list[Metric],
    plan: LocalPlan,
    out: Path,
    *,
    invocation: str,
    quick: bool,
    lab_appendix: str = "",
    load: str = "",
) -> str:
    """benchmarks.md (with profiles of missed targets), benchmarks.json and the plots in ``out``."""
    from kvmpy.bench.report import render, write_plots

    out.mkdir(parents=True, exist_ok=True)
    appendix = "\n".join(filter(None, [_profiles(metrics, plan), lab_appendix]))
    plots = write_plots(metrics, out)
    report = render(
        metrics,
        title="kvmpy benchmarks" + (" (quick)" if quick else ""),
        preamble=PREAMBLE.format(command=f"{invocation} --out {out}"),
        plots=plots,
        appendix=appendix,
        load=load,
    )
    (out / "benchmarks.md").write_text(report)
    (out / "benchmarks.json").write_text(json.dumps([_sample_record(m) for m in metrics], indent=1))
    return report


def _sample_record(metric: Metric) -> dict[str, object]:
    record = asdict(metric)
    record["better"] = metric.better.value
    record["ratio"] = metric.ratio
    record["met"] = metric.met()
    return record


#: The suites ``--only`` chooses from: this machine's start-up, exits (with their floors) and
#: memory; the API; snapshots and migration; the lab; the vhost data planes (here and in a lab
#: boot of their own).
SUITES = ("exits", "api", "state", "lab", "vhost")


def _suites(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in SUITES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {','.join(SUITES)}")
    return tuple(name for name in SUITES if name in names)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    bench = subparsers.add_parser("bench", help="benchmark kvmpy against QEMU/KVM on identical guests")
    bench.add_argument("--quick", action="store_true", help="fewer runs, this machine only (under 5 minutes)")
    bench.add_argument("--out", type=Path, default=Path("bench-results"), help="directory for the report")
    bench.add_argument("--no-lab", action="store_true", help="skip the Linux benchmarks in the lab")
    bench.add_argument("--repetitions", type=_positive, help="runs per VMM for each figure on this machine")
    bench.add_argument(
        "--only",
        type=_suites,
        default=SUITES,
        metavar="SUITES",
        help="run only these suites, comma-separated: exits (start-up, exit round trips and their "
        "floors, memory), api, state (snapshots, migration), lab, vhost (vhost-user and vhost-net,"
        " here and in the lab)",
    )
    bench.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report in --out from its benchmarks.json and the last lab run's logs",
    )
    bench.set_defaults(handler=_bench)


__all__ = ["register", "write_report"]
