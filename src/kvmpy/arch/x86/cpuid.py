"""The guest's CPUID: KVM's supported leaves, made consistent for N vCPUs.

KVM_GET_SUPPORTED_CPUID says what the host and KVM can offer; a VMM must
still say what *this* VM is: each vCPU's APIC ID, how many logical
processors share a package, the hypervisor bit, and KVM's paravirtual
leaves. Linux derives its CPU topology from these leaves, so they must agree
with the MP table and the MADT (APIC ID = vCPU index, one core per vCPU, one
package).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

HYPERVISOR_BIT = 1 << 31  # leaf 1 ECX
TSC_DEADLINE_BIT = 1 << 24  # leaf 1 ECX: the LAPIC timer's TSC-deadline mode
KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_CPUID_SIGNATURE = 0x4000_0000
KVM_CPUID_FEATURES = 0x4000_0001
X2APIC_TOPOLOGY_LEAVES = (0xB, 0x1F)
LEVEL_TYPE_SMT = 1
LEVEL_TYPE_CORE = 2


@dataclass(frozen=True, slots=True)
class CpuidEntry:
    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _bits_for(count: int) -> int:
    """Width of an APIC ID field that can number ``count`` items."""
    return max(count - 1, 0).bit_length()


def build_guest_cpuid(
    supported: list[CpuidEntry], *, vcpu_id: int, n_vcpus: int, tsc_deadline: bool = False
) -> list[CpuidEntry]:
    """The CPUID table for vCPU ``vcpu_id`` of ``n_vcpus`` (one core each, one package).

    ``tsc_deadline``: KVM emulates the LAPIC timer's TSC-deadline mode
    (KVM_CAP_TSC_DEADLINE_TIMER) but leaves it out of KVM_GET_SUPPORTED_CPUID, since
    the in-kernel LAPIC that implements it is the VMM's choice; a VMM with that LAPIC
    says so itself, as QEMU does. Linux then arms its timer with one MSR write instead
    of calibrating the LAPIC timer and programming its counter.
    """
    core_bits = _bits_for(n_vcpus)
    result = []
    for entry in supported:
        adjusted = _adjust(entry, vcpu_id, n_vcpus, core_bits)
        if tsc_deadline and adjusted.function == 1:
            adjusted = dataclasses.replace(adjusted, ecx=adjusted.ecx | TSC_DEADLINE_BIT)
        result.append(adjusted)
    if not any(e.function == KVM_CPUID_SIGNATURE for e in result):
        ebx, ecx, edx = (int.from_bytes(KVM_SIGNATURE[i : i + 4], "little") for i in (0, 4, 8))
        result.append(CpuidEntry(KVM_CPUID_SIGNATURE, 0, 0, KVM_CPUID_FEATURES, ebx, ecx, edx))
    return result


def _adjust(entry: CpuidEntry, vcpu_id: int, n_vcpus: int, core_bits: int) -> CpuidEntry:
    fn = entry.function
    replace = dataclasses.replace
    if fn == 1:
        # EBX[31:24] initial APIC ID, EBX[23:16] logical processors per package; HTT if > 1.
        ebx = (entry.ebx & 0x0000FFFF) | (vcpu_id << 24) | (min(n_vcpus, 255) << 16)
        edx = entry.edx | (1 << 28) if n_vcpus > 1 else entry.edx & ~(1 << 28)
        return replace(entry, ebx=ebx, ecx=entry.ecx | HYPERVISOR_BIT, edx=edx)
    if fn == 4:
        # EAX[31:26] cores per package - 1; EAX[25:14] logical processors sharing this cache - 1.
        cores = min(n_vcpus, 64) - 1
        eax = (entry.eax & 0x3FFF) | (cores << 26)
        if entry.eax & 0x1F:  # a valid cache level: shared by one core
            eax |= 0 << 14
        return replace(entry, eax=eax)
    if fn in X2APIC_TOPOLOGY_LEAVES:
        return _x2apic_topology(entry, vcpu_id, n_vcpus, core_bits)
    if fn == 0x8000_0008:
        # ECX[15:12] APIC ID size, ECX[7:0] number of cores - 1 (AMD).
        ecx = (entry.ecx & ~0xF0FF) | (core_bits << 12) | ((n_vcpus - 1) & 0xFF)
        return replace(entry, ecx=ecx)
    if fn == 0x8000_001E:
        # AMD extended APIC ID and topology: one thread per core, core ID = vCPU index.
        return replace(entry, eax=vcpu_id, ebx=(entry.ebx & ~0xFF00) | (vcpu_id & 0xFF), ecx=0)
    if fn == KVM_CPUID_SIGNATURE:
        return replace(entry, eax=max(entry.eax, KVM_CPUID_FEATURES))
    return entry


def _x2apic_topology(entry: CpuidEntry, vcpu_id: int, n_vcpus: int, core_bits: int) -> CpuidEntry:
    """Leaves 0xB/0x1F: level 0 = SMT (1 thread), level 1 = core (N cores), then invalid."""
    if entry.index == 0:
        eax, ebx, ecx = 0, 1, (LEVEL_TYPE_SMT << 8) | 0
    elif entry.index == 1:
        eax, ebx, ecx = core_bits, n_vcpus, (LEVEL_TYPE_CORE << 8) | 1
    else:
        eax, ebx, ecx = 0, 0, entry.index & 0xFF
    return dataclasses.replace(entry, eax=eax, ebx=ebx, ecx=ecx, edx=vcpu_id)


__all__ = ["CpuidEntry", "build_guest_cpuid"]
