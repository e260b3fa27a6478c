"""The benchmark report: a Markdown table of medians, ratios and targets, and PNG plots."""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from kvmpy.bench.metric import Metric


def _figure(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _verdict(metric: Metric) -> str:
    met = metric.met()
    if metric.target is None:
        return "–"
    target = metric.target.describe(metric.better, metric.unit)
    if met is None:
        return f"{target} (not measured)"
    return f"{target}: {'met' if met else '**missed**'}"


def machine_description() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()}, {cpu}, Linux {platform.release()}"


def load_average() -> str:
    """The host's 1, 5 and 15 minute load averages, as a report shows them."""
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def markdown_table(metrics: Sequence[Metric], date: str) -> str:
    lines = [
        "| metric | kvmpy | QEMU | ratio | target | machine | date |",
        "|---|---:|---:|---:|---|---|---|",
    ]
    for metric in metrics:
        ratio = f"{metric.ratio:.2f}×" if metric.ratio is not None else "–"
        samples = len(metric.kvmpy)
        lines.append(
            f"| {metric.title} ({metric.unit}, n={samples}) | {_figure(metric.kvmpy_median)} "
            f"| {_figure(metric.qemu_median)} | {ratio} | {_verdict(metric)} | {metric.where} | {date} |"
        )
    return "\n".join(lines)


def render(
    metrics: Sequence[Metric],
    *,
    title: str,
    preamble: str,
    plots: Sequence[Path],
    appendix: str = "",
    now: datetime | None = None,
    load: str = "",
) -> str:
    """The whole Markdown report (``load``: the host's load averages during the run, if known)."""
    date = (now or datetime.now(UTC)).strftime("%Y-%m-%d")
    missed = [m for m in metrics if m.met() is False]
    machine = f"Machine: {machine_description()}." + (f" {load}" if load else "")
    parts = [f"# {title}", "", preamble.strip(), "", machine, ""]
    parts += [markdown_table(metrics, date), ""]
    if missed:
        parts.append("Targets missed: " + "; ".join(f"{m.title} ({m.ratio_text()})" for m in missed) + ".")
        parts.append("")
    notes = [f"- {m.title}: {m.note}" for m in metrics if m.note]
    if notes:
        parts += ["Notes:", "", *notes, ""]
    for plot in plots:
        parts += [f"![{plot.stem}]({plot.name})", ""]
    if appendix:
        parts += [appendix.strip(), ""]
    return "\n".join(parts)


def write_plots(metrics: Sequence[Metric], out: Path) -> list[Path]:
    """One PNG per unit: the distribution of each metric's samples for both VMMs."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups: dict[str, list[Metric]] = {}
    for metric in metrics:
        if metric.kvmpy:
            groups.setdefault(metric.unit, []).append(metric)
    paths = []
    for unit, group in groups.items():
        figure, axes = plt.subplots(figsize=(max(6.0, 2.2 * len(group)), 4.0))
        data, labels, positions = [], [], []
        for index, metric in enumerate(group):
            for offset, (vmm, samples) in enumerate((("kvmpy", metric.kvmpy), ("QEMU", metric.qemu))):
                if samples:
                    data.append(samples)
                    labels.append(f"{metric.key}\n{vmm}")
                    positions.append(index * 3 + offset)
        axes.boxplot(data, positions=positions, widths=0.8)
        axes.set_xticks(positions, labels, fontsize=7)
        axes.set_ylabel(unit)
        axes.set_title(f"kvmpy and QEMU/KVM: distributions ({unit})")
        figure.tight_layout()
        path = out / f"bench-{_slug(unit)}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        paths.append(path)
    return paths


def _slug(unit: str) -> str:
    names = {"µs": "us", "MiB": "mib", "MB/s": "mbps", "Mbit/s": "mbitps", "%": "percent"}
    return names.get(unit, "".join(c for c in unit.lower() if c.isalnum()) or "other")


__all__ = ["load_average", "machine_description", "markdown_table", "render", "write_plots"]
