"""Linux boot in the lab under kvmpy, QEMU pc and QEMU microvm, with exits per boot, alone.

    python tools/lab_boot_bench.py [--boots N]

The boot rows of ``kvmpy bench`` (kvmpy.bench.boot_bench) without the rest of its lab suite:
``N`` boots (default 3) of each VMM with and without ``quiet``, alternating, in one lab boot,
then one kvmpy boot with ``--stats`` whose own count of exits is printed beside the lab kernel's.
Prints the Markdown rows for docs/benchmarks.md and where each VMM's exits come from. The lab's
output is kept in ~/.cache/kvmpy/bench/lab-boots-npt1-*.log.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import replace
from datetime import UTC, datetime

from kvmpy.bench import lab
from kvmpy.bench.boot_bench import boot_metrics, boot_scenarios
from kvmpy.bench.report import load_average, markdown_table
from kvmpy.lab.scenarios import Scenario


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3, help="boots of each VMM and variant")
    args = parser.parse_args()
    kernel, initrd = lab.bench_initrd()
    base = Scenario("", str(kernel), str(initrd), "", cpus=2, memory="512M", timeout=300.0, retries=1)
    stats = replace(base, name="stats-kvmpy", command="poweroff -f", args=("--stats",), count_exits=True)
    scenarios = [*boot_scenarios(base, args.boots), stats]
    before = load_average()
    results = lab.run_lab_batch(scenarios, npt=True, progress=print, batch="boots")
    print(f"load average before: {before}; after: {load_average()}\n")
    metrics = boot_metrics(results, lab.WHERE, lab._finished)
    print(markdown_table(metrics, datetime.now(UTC).strftime("%Y-%m-%d")), end="\n\n")
    for metric in metrics:
        if metric.note:
            print(f"- {metric.title}: {metric.note}")
    checked = results.get("stats-kvmpy")
    if checked is not None:
        own = re.search(r"exits to userspace: (\d+)", checked.stderr)
        kernel_count = sum(checked.exits.values())
        print(f"\nkvmpy's own count: {own.group(1) if own else 'none'}; the lab kernel's: {kernel_count}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
