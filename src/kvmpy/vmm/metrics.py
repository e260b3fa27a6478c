"""Metrics as Firecracker writes them: one JSON object per line, on FlushMetrics and every minute.

kvmpy writes totals since the VM started (Firecracker writes most counters as
the change since the last flush): every component of the metrics registry
(vCPUs, bus ranges, virtio devices, the PCI root, the 16550A, the console, the
event loop) under its stable name, and the VMM's own state. The same counters
``--stats`` and ``/kvmpy/stats`` show.
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
    """Every counter of the VMM and its current machine, from the one metrics registry."""
    metrics: dict[str, Any] = {
        "utc_timestamp_ms": int(time.time() * 1000),
        "vmm": {"state": vmm.state.value, "boots": vmm.boots},
    }
    machine = vmm.machine
    if machine is not None:
        metrics.update(machine.metrics.snapshot())
    return metrics


__all__ = ["MetricsWriter", "collect_metrics"]
