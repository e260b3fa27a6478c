"""Metrics as Firecracker writes them: one JSON object per line, on FlushMetrics and every minute.

kvmpy writes totals since the VM started (Firecracker writes most counters as
the change since the last flush): exits by reason, every bus device's
accesses, and the VMM's own state. The same figures ``--stats`` prints.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmpy.vmm.log_output import open_for_append

if TYPE_CHECKING:
    from kvmpy.vmm.vmm import Vmm


class MetricsWriter:
    """Appends one line of JSON per flush to a file or FIFO."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = open_for_append(path, "metrics")
        self.lines = 0

    def write(self, metrics: dict[str, Any]) -> None:
        os.write(self._fd, json.dumps(metrics, separators=(",", ":")).encode() + b"\n")
        self.lines += 1

    def close(self) -> None:
        os.close(self._fd)


def collect_metrics(vmm: Vmm) -> dict[str, Any]:
    """Every counter of the VMM and its current machine, under stable names."""
    metrics: dict[str, Any] = {
        "utc_timestamp_ms": int(time.time() * 1000),
        "vmm": {"state": vmm.state.value, "boots": vmm.boots},
    }
    machine = vmm.machine
    if machine is None:
        return metrics
    exits: dict[str, int] = {}
    guest_ns = 0
    for thread in machine.threads:
        for reason, counter in thread.stats.reasons.items():
            exits[f"exit_{reason}"] = exits.get(f"exit_{reason}", 0) + counter.count
        guest_ns += thread.stats.guest_ns
    metrics["vcpu"] = {**exits, "guest_us": guest_ns // 1000}
    devices: dict[str, dict[str, int]] = {}
    for bus in (machine.pio_bus, machine.mmio_bus):
        for row in bus.stats():
            devices[row.name] = {"reads": row.reads, "writes": row.writes, "bytes": row.bytes}
    metrics["devices"] = devices
    return metrics


__all__ = ["MetricsWriter", "collect_metrics"]
