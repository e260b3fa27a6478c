"""The ``--stats`` table: exits by reason, by device and by unclaimed address."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from kvmpy.bus import Bus, BusAccessStats
from kvmpy.bus.bus import OTHER_UNCLAIMED
from kvmpy.vmm.exit_stats import ReasonTotal, VcpuExitStats, merge_reasons


@dataclass(frozen=True, slots=True)
class MachineStats:
    """A snapshot of every counter of one VM run, as plain data."""

    wall_seconds: float
    vcpus: tuple[VcpuExitStats, ...]
    reasons: tuple[ReasonTotal, ...]
    pio: tuple[BusAccessStats, ...]
    mmio: tuple[BusAccessStats, ...]
    unhandled_pio: tuple[tuple[int, int], ...]
    unhandled_mmio: tuple[tuple[int, int], ...]
    #: The metrics registry's devices (not the vCPUs and bus ranges, which have their own
    #: tables): (component, ((counter, value), ...)).
    counters: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()

    @property
    def total_exits(self) -> int:
        return sum(row.count for row in self.reasons)

    def device(self, name: str) -> BusAccessStats:
        for row in self.pio + self.mmio:
            if row.name == name:
                return row
        raise KeyError(name)


def collect(
    wall_seconds: float,
    vcpus: list[VcpuExitStats],
    pio: Bus,
    mmio: Bus,
    registry: Mapping[str, Mapping[str, int]] | None = None,
) -> MachineStats:
    """Every counter now, as plain data; ``registry`` is a metrics registry's snapshot."""
    return MachineStats(
        wall_seconds=wall_seconds,
        vcpus=tuple(vcpus),
        reasons=tuple(merge_reasons(vcpus)),
        pio=tuple(row for row in pio.stats() if row.reads or row.writes),
        mmio=tuple(row for row in mmio.stats() if row.reads or row.writes),
        unhandled_pio=tuple(pio.unclaimed()),
        unhandled_mmio=tuple(mmio.unclaimed()),
        counters=_device_counters(registry or {}),
    )


def _device_counters(
    registry: Mapping[str, Mapping[str, int]],
) -> tuple[tuple[str, tuple[tuple[str, int], ...]], ...]:
    shown_elsewhere = ("vcpu", "pio.", "mmio.")
    return tuple(
        (component, tuple(sorted(counters.items())))
        for component, counters in registry.items()
        if not component.startswith(shown_elsewhere)
    )


#: The KVM per-vCPU counters worth showing next to kvmpy's own.
KERNEL_COUNTERS = (
    "exits",
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "signal_exits",
    "irq_window_exits",
    "request_irq_exits",
    "insn_emulation",
    "pf_taken",
    "pf_fixed",
    "tlb_flush",
    "hypercalls",
)


def _kernel_totals(vcpus: tuple[VcpuExitStats, ...]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for vcpu in vcpus:
        for name, value in vcpu.kernel.items():
            totals[name] = totals.get(name, 0) + value
    return totals


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    return [line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _buffered_totals(vcpus: tuple[VcpuExitStats, ...]) -> dict[tuple[bool, int], int]:
    totals: dict[tuple[bool, int], int] = {}
    for vcpu in vcpus:
        for key, count in vcpu.buffered.items():
            totals[key] = totals.get(key, 0) + count
    return totals


def _us(ns: int, count: int) -> str:
    return f"{ns / count / 1000:.1f}" if count else "-"


def format_stats(stats: MachineStats) -> str:
    """A human-readable report of where the VM's exits went."""
    out = [f"kvmpy exit statistics ({stats.wall_seconds:.3f} s wall, {len(stats.vcpus)} vCPU)"]
    total = stats.total_exits
    guest_s = sum(v.guest_ns for v in stats.vcpus) / 1e9
    out.append(f"exits to userspace: {total}   time in KVM_RUN: {guest_s:.3f} s (all vCPUs)")
    buffered = _buffered_totals(stats.vcpus)
    if buffered:
        where = ", ".join(f"{address:#x}" for _, address in sorted(buffered))
        out.append(
            f"writes buffered by KVM instead of exiting (coalesced, at {where}): {sum(buffered.values())}"
        )
    out.append("")
    out += _table(
        ["exit reason", "count", "%", "handler us/exit"],
        [
            [
                r.reason,
                str(r.count),
                f"{100 * r.count / total:.1f}" if total else "-",
                _us(r.handle_ns, r.count),
            ]
            for r in stats.reasons
        ],
    )
    for title, rows, is_pio in (("port I/O", stats.pio, True), ("MMIO", stats.mmio, False)):
        if not rows:
            continue
        out.append("")
        table = []
        for row in rows:
            held = sum(
                n for (pio, a), n in buffered.items() if pio == is_pio and row.base <= a < row.base + row.size
            )
            accesses = row.reads + row.writes
            table.append(
                [
                    row.name,
                    f"{row.base:#x}-{row.base + row.size - 1:#x}",
                    str(row.reads),
                    str(row.writes),
                    str(held),
                    str(accesses - held),
                    str(row.bytes),
                    _us(row.handle_ns, accesses),
                ]
            )
        headers = [
            f"{title} device",
            "range",
            "reads",
            "writes",
            "buffered",
            "exits",
            "bytes",
            "device us/access",
        ]
        out += _table(headers, table)
    for title, unhandled in (("port", stats.unhandled_pio), ("MMIO address", stats.unhandled_mmio)):
        if not unhandled:
            continue
        out.append("")
        shown = [[f"{a:#x}" if a != OTHER_UNCLAIMED else "others", str(n)] for a, n in unhandled[:20]]
        out += _table([f"unclaimed {title}", "accesses"], shown)
        if len(unhandled) > 20:
            out.append(f"... and {len(unhandled) - 20} more")
    kernel = _kernel_totals(stats.vcpus)
    if kernel:
        out.append("")
        out.append("in-kernel counters (KVM_GET_STATS_FD; exits KVM handled itself never reach kvmpy):")
        out += _table(
            ["KVM counter", "count"],
            [[name, str(kernel[name])] for name in KERNEL_COUNTERS if name in kernel],
        )
    out += _counter_table(stats.counters)
    if len(stats.vcpus) > 1:
        out.append("")
        out += _table(
            ["vCPU", "exits", "time in guest s"],
            [[str(v.vcpu_id), str(v.total_exits), f"{v.guest_ns / 1e9:.3f}"] for v in stats.vcpus],
        )
    return "\n".join(out)


def _counter_table(counters: tuple[tuple[str, tuple[tuple[str, int], ...]], ...]) -> list[str]:
    """The devices' own counters that are not zero (guest errors, drops, throttling...)."""
    rows = [
        [component, name, str(value)] for component, values in counters for name, value in values if value
    ]
    if not counters:
        return []
    if not rows:
        return ["", "device counters (metrics registry): all zero (no guest errors, drops or throttling)"]
    return ["", "device counters (metrics registry):", *_table(["device", "counter", "value"], rows)]


def _device_rows(report: str, device: str) -> list[tuple[str, str, str, str]]:
    """(reads, writes, buffered, exits) of ``device``'s rows (its BARs too) in a printed report."""
    pattern = re.compile(
        rf"^{re.escape(device)}\S*(?: BAR\d)?\s+0x[0-9a-f]+-0x[0-9a-f]+\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)",
        re.M,
    )
    return pattern.findall(report)


def device_accesses(report: str, device: str) -> int:
    """Reads plus writes on ``device``'s rows of a printed :func:`format_stats`."""
    return sum(int(reads) + int(writes) for reads, writes, _, _ in _device_rows(report, device))


def device_exits(report: str, device: str) -> int:
    """The accesses to ``device`` that exited to kvmpy (not buffered by KVM), from a printed report."""
    return sum(int(exits) for _, _, _, exits in _device_rows(report, device))


__all__ = ["device_accesses", "device_exits", "MachineStats", "collect", "format_stats"]
