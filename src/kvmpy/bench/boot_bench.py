"""Linux boot in the lab: kvmpy against QEMU's pc machine and QEMU's microvm machine.

The three VMMs boot the same kernel, initramfs and command line, with and without ``quiet``
(the kernel's console output is a large share of a boot's exits), alternating. Every boot also
counts its returns from KVM_RUN to the VMM in the lab's kernel (kvmpy.lab.exit_trace), so the
exits per boot stand side by side, measured the same way for all three.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace

from kvmpy.bench.metric import Metric, Target
from kvmpy.lab.scenarios import Scenario, ScenarioResult

#: kvmpy and its two peers; "microvm" is QEMU/KVM on its microvm machine (no PCI, no firmware
#: tables beyond what the kernel needs).
BOOT_VMMS = ("kvmpy", "qemu", "microvm")
VARIANTS = ("", "quiet")
PEERS = {"qemu": ("QEMU pc", 0.8), "microvm": ("QEMU microvm", 1.0)}  # issue 17's targets
#: The lab module's check that a run ended cleanly: the run, or None with a note on the metric.
Finished = Callable[[dict[str, ScenarioResult], str, Metric], ScenarioResult | None]


def boot_name(vmm: str, variant: str, index: int) -> str:
    return f"boot-{vmm}-{variant}-{index}" if variant else f"boot-{vmm}-{index}"


def boot_scenarios(base: Scenario, boots: int) -> list[Scenario]:
    """``boots`` boots of each VMM, each variant, alternating; the guest powers off at once."""
    scenarios = []
    for index in range(boots):
        for variant in VARIANTS:
            for vmm in BOOT_VMMS:
                scenarios.append(
                    replace(
                        base,
                        name=boot_name(vmm, variant, index),
                        vmm=vmm,
                        command="poweroff -f",
                        kernel_args=f"{base.kernel_args} {variant}".strip(),
                        count_exits=True,
                    )
                )
    return scenarios


def _runs(results: dict[str, ScenarioResult], vmm: str, variant: str) -> list[str]:
    """The names of ``vmm``'s boots of ``variant`` among ``results``, whatever their number."""
    prefix = f"boot-{vmm}-{variant}-" if variant else f"boot-{vmm}-"
    return [name for name in results if name.startswith(prefix) and name[len(prefix) :].isdigit()]


def boot_metrics(results: dict[str, ScenarioResult], where: str, finished: Finished) -> list[Metric]:
    """Boot to init and exits per boot, kvmpy against each peer, for each variant."""
    metrics = []
    for peer, (label, ratio) in PEERS.items():
        for variant in VARIANTS:
            suffix = ("" if peer == "qemu" else f"_{peer}") + (f"_{variant}" if variant else "")
            how = f"smp2{', quiet' if variant else ''}; peer: {label}"
            target = Target(ratio)
            boot = Metric(f"boot_to_init{suffix}", f"Linux boot to init ({how})", "s", where, target=target)
            exits = Metric(f"boot_exits{suffix}", f"Exits to the VMM per Linux boot ({how})", "exits", where)
            by_reason: dict[str, dict[str, list[int]]] = {"kvmpy": {}, "qemu": {}}
            for column, vmm in (("kvmpy", "kvmpy"), ("qemu", peer)):
                for name in _runs(results, vmm, variant):
                    result = finished(results, name, boot)
                    if result is None:
                        continue
                    if result.ready_seconds is not None:
                        getattr(boot, column).append(result.ready_seconds)
                    if result.exits:
                        getattr(exits, column).append(float(sum(result.exits.values())))
                        for reason, count in result.exits.items():
                            by_reason[column].setdefault(reason, []).append(count)
            exits.note = _reasons_note(by_reason, label)
            metrics += [boot, exits]
    return metrics


def _reasons_note(by_reason: dict[str, dict[str, list[int]]], label: str) -> str:
    """The median count of each exit reason, per VMM: where each one's exits come from."""
    parts = []
    for column, name in (("kvmpy", "kvmpy"), ("qemu", label)):
        reasons = by_reason[column]
        if not reasons:
            continue
        medians = sorted(((statistics.median(v), r) for r, v in reasons.items()), reverse=True)
        parts.append(f"{name}: " + ", ".join(f"{reason} {count:,.0f}" for count, reason in medians))
    return "; ".join(parts) + ("; counted by the lab kernel's kvm_userspace_exit tracepoint" if parts else "")


__all__ = ["BOOT_VMMS", "boot_metrics", "boot_name", "boot_scenarios"]
