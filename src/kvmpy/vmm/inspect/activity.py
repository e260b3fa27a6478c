"""``vcpus`` and ``stats``: what each vCPU is doing and where the exits went, so far.

The counters are written by the vCPU threads while this runs; each one is
copied with a single dict copy (atomic under the GIL) before it is summed, so
a sample never sees a dict change size under it. Rates per interval are the
client's business: it takes two samples and divides by ``sampled_at``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
import weakref
from typing import TYPE_CHECKING, Any

from kvmpy.abi import kvm as abi
from kvmpy.errors import KvmpyError
from kvmpy.kvm import Vcpu
from kvmpy.kvm.binary_stats import BinaryStats
from kvmpy.vmm.exit_stats import ReasonCounter, VcpuExitStats
from kvmpy.vmm.inspect.addresses import on_vcpu
from kvmpy.vmm.stats_report import MachineStats, collect, format_stats

if TYPE_CHECKING:
    from kvmpy.vmm.machine import Machine

MP_STATES = {
    abi.KVM_MP_STATE_RUNNABLE: "runnable",
    abi.KVM_MP_STATE_UNINITIALIZED: "uninitialized",
    abi.KVM_MP_STATE_INIT_RECEIVED: "init-received",
    abi.KVM_MP_STATE_HALTED: "halted",
    abi.KVM_MP_STATE_SIPI_RECEIVED: "sipi-received",
    abi.KVM_MP_STATE_STOPPED: "stopped",
    abi.KVM_MP_STATE_CHECK_STOP: "check-stop",
    abi.KVM_MP_STATE_OPERATING: "operating",
    abi.KVM_MP_STATE_LOAD: "load",
    abi.KVM_MP_STATE_AP_RESET_HOLD: "ap-reset-hold",
    abi.KVM_MP_STATE_SUSPENDED: "suspended",
}


_WAITING_FOR_STARTUP = (
    abi.KVM_MP_STATE_UNINITIALIZED,
    abi.KVM_MP_STATE_INIT_RECEIVED,
    abi.KVM_MP_STATE_SIPI_RECEIVED,
)


def snapshot(stats: VcpuExitStats) -> VcpuExitStats:
    """A private copy of a vCPU's counters, safe to iterate while its thread keeps counting."""
    reasons = dict(stats.reasons)
    return dataclasses.replace(  # scalar counters come along as they are
        stats,
        reasons={name: ReasonCounter(c.count, c.handle_ns) for name, c in reasons.items()},
        ports=dict(stats.ports),
        buffered=dict(stats.buffered),
        kernel=dict(stats.kernel),
    )


#: One open KVM stats file per vCPU, kept while the vCPU lives: opening one is a vCPU ioctl
#: (it waits for an exit), reading it is a pread that does not disturb the guest.
_kernel_stats: weakref.WeakKeyDictionary[Vcpu, BinaryStats | None] = weakref.WeakKeyDictionary()
_kernel_stats_lock = threading.Lock()


def _open_kernel_stats(vcpu: Vcpu) -> BinaryStats | None:
    try:
        stats = vcpu.open_stats()
    except (KvmpyError, OSError):
        return None  # a KVM without KVM_GET_STATS_FD
    weakref.finalize(vcpu, stats.close)
    return stats


def kernel_counters(machine: Machine, vcpu: Vcpu) -> dict[str, int]:
    """KVM's in-kernel counters for ``vcpu`` now (the exits KVM handled without kvmpy)."""
    with _kernel_stats_lock:
        if vcpu not in _kernel_stats:
            _kernel_stats[vcpu] = on_vcpu(machine, vcpu.id, _open_kernel_stats)
        stats = _kernel_stats[vcpu]
    if stats is None:
        return {}
    try:
        return stats.read()
    except OSError:
        return {}


def _vcpu_stats(machine: Machine) -> list[VcpuExitStats]:
    """Every vCPU's counters (zero for a vCPU whose thread has not started), with KVM's own
    counters read now where the run has not ended (a vCPU thread reads them at its end)."""
    by_id = {thread.vcpu.id: snapshot(thread.stats) for thread in machine.threads}
    rows = []
    for vcpu in machine.vcpus:
        stats = by_id.get(vcpu.id, VcpuExitStats(vcpu.id))
        if not stats.kernel:
            stats.kernel = kernel_counters(machine, vcpu)
        rows.append(stats)
    return rows


def vcpu_state(mp_state: int, thread_alive: bool, vm_state: str) -> str:
    """running, halted, waiting for SIPI, paused or stopped: KVM's mp_state and the lifecycle state."""
    if vm_state == "Paused":
        return "paused"
    if not thread_alive:
        return "not started" if vm_state == "Not started" else "stopped"
    if mp_state == abi.KVM_MP_STATE_HALTED:
        return "halted"
    if mp_state in _WAITING_FOR_STARTUP:
        return "waiting for SIPI"  # an AP the guest has not started: KVM_RUN blocks in the kernel
    return "running"


def vcpus(machine: Machine, vm_state: str) -> dict[str, Any]:
    threads = {thread.vcpu.id: thread for thread in machine.threads}
    rows = []
    for vcpu, stats in zip(machine.vcpus, _vcpu_stats(machine), strict=True):
        mp_state = on_vcpu(machine, vcpu.id, lambda v: v.get_mp_state())
        thread = threads.get(vcpu.id)
        alive = thread is not None and thread.is_alive()
        rows.append(
            {
                "vcpu": vcpu.id,
                "state": vcpu_state(mp_state, alive, vm_state),
                "mp_state": MP_STATES.get(mp_state, f"unknown ({mp_state})"),
                "exits": stats.total_exits,
                "exits_by_reason": {name: c.count for name, c in sorted(stats.reasons.items()) if c.count},
                "guest_seconds": stats.guest_ns / 1e9,
                "guest_errors": stats.guest_errors,
            }
        )
    return {"vm_state": vm_state, "vcpus": rows}


def machine_stats(machine: Machine, wall_seconds: float) -> MachineStats:
    return collect(
        wall_seconds, _vcpu_stats(machine), machine.pio_bus, machine.mmio_bus, machine.metrics.snapshot()
    )


def stats_dict(stats: MachineStats) -> dict[str, Any]:
    """The ``--stats`` figures as data, and the ``--stats`` table as text."""

    def bus_rows(rows: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [
            {
                "name": r.name,
                "base": r.base,
                "size": r.size,
                "reads": r.reads,
                "writes": r.writes,
                "bytes": r.bytes,
                "handle_ns": r.handle_ns,
            }
            for r in rows
        ]

    buffered: dict[tuple[bool, int], int] = {}
    kernel: dict[str, int] = {}
    for vcpu in stats.vcpus:
        for key, count in vcpu.buffered.items():
            buffered[key] = buffered.get(key, 0) + count
        for name, value in vcpu.kernel.items():
            kernel[name] = kernel.get(name, 0) + value
    return {
        "sampled_at": time.monotonic(),
        "wall_seconds": stats.wall_seconds,
        "total_exits": stats.total_exits,
        "guest_seconds": sum(v.guest_ns for v in stats.vcpus) / 1e9,
        "reasons": [{"reason": r.reason, "count": r.count, "handle_ns": r.handle_ns} for r in stats.reasons],
        "pio": bus_rows(stats.pio),
        "mmio": bus_rows(stats.mmio),
        "buffered": [{"pio": pio, "address": a, "count": n} for (pio, a), n in sorted(buffered.items())],
        "unhandled_pio": [{"address": a, "count": n} for a, n in stats.unhandled_pio],
        "counters": {component: dict(values) for component, values in stats.counters},
        "unhandled_mmio": [{"address": a, "count": n} for a, n in stats.unhandled_mmio],
        "kernel": kernel,
        "vcpus": [
            {
                "vcpu": v.vcpu_id,
                "exits": v.total_exits,
                "guest_ns": v.guest_ns,
                "guest_errors": v.guest_errors,
            }
            for v in stats.vcpus
        ],
        "table": format_stats(stats),
    }


__all__ = ["machine_stats", "snapshot", "stats_dict", "vcpu_state", "vcpus"]
