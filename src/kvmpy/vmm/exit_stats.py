"""Exit accounting: how often each vCPU left the guest, why, and what it cost.

Every exit that reaches kvmpy is recorded by reason with the wall time spent
handling it in Python; the time spent inside KVM_RUN is recorded too. Per
device counts come from the buses (see :mod:`kvmpy.bus.bus`). This is the
trap-and-emulate loop made visible: ``kvmpy run --stats`` prints it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field


@dataclass(slots=True)
class ReasonCounter:
    """Count and handling time of one exit reason."""

    count: int = 0
    handle_ns: int = 0


@dataclass
class VcpuExitStats:
    """Exit counters of one vCPU (written only by that vCPU's thread)."""

    vcpu_id: int
    reasons: dict[str, ReasonCounter] = field(default_factory=dict)
    guest_ns: int = 0
    #: Port-I/O exits per port (one exit may carry several accesses with REP INS/OUTS); a
    #: defaultdict, so the exit path counts with one ``+= 1``.
    ports: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    #: Writes KVM buffered in the coalesced ring instead of exiting, replayed by this vCPU,
    #: by (is port I/O, address).
    buffered: dict[tuple[bool, int], int] = field(default_factory=dict)
    #: Guest errors raised by device code on this vCPU's exits (contained: the VM went on).
    guest_errors: int = 0
    #: KVM's in-kernel counters for this vCPU at the end of the run (KVM_GET_STATS_FD).
    kernel: dict[str, int] = field(default_factory=dict)

    def record(self, reason: str, guest_ns: int, handle_ns: int) -> None:
        counter = self.counter(reason)
        counter.count += 1
        counter.handle_ns += handle_ns
        self.guest_ns += guest_ns

    def counter(self, reason: str) -> ReasonCounter:
        """The counter of ``reason``, made (at zero) if there is none: the exit path holds the
        counters of its common exits and adds to them directly (readers leave zeros out)."""
        counter = self.reasons.get(reason)
        if counter is None:
            counter = self.reasons[reason] = ReasonCounter()
        return counter

    @property
    def coalesced(self) -> int:
        """All the buffered writes this vCPU replayed."""
        return sum(self.buffered.values())

    @property
    def total_exits(self) -> int:
        return sum(c.count for c in self.reasons.values())


@dataclass(frozen=True, slots=True)
class ReasonTotal:
    reason: str
    count: int
    handle_ns: int


def merge_reasons(per_vcpu: list[VcpuExitStats]) -> list[ReasonTotal]:
    """Sum the per-vCPU counters by reason, most frequent first."""
    totals: dict[str, ReasonCounter] = {}
    for stats in per_vcpu:
        for reason, counter in stats.reasons.items():
            if not counter.count:
                continue  # made ahead by the exit path, never taken
            total = totals.setdefault(reason, ReasonCounter())
            total.count += counter.count
            total.handle_ns += counter.handle_ns
    rows = [ReasonTotal(reason, c.count, c.handle_ns) for reason, c in totals.items()]
    return sorted(rows, key=lambda row: (-row.count, row.reason))


__all__ = ["ReasonCounter", "ReasonTotal", "VcpuExitStats", "merge_reasons"]
