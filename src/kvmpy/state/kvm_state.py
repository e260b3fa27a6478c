"""KVM's part of a VM's state: every vCPU's registers and in-kernel devices, as plain data.

A vCPU is its general, special, FPU/XSAVE and extended control registers,
every MSR KVM lists for save and restore, its local APIC, its run state
(mp_state), pending events, debug registers, its CPUID and its TSC
frequency. The VM is the two PICs, the IOAPIC, the PIT and kvmclock.

KVM's structures are kept as their raw bytes (the kernel's ABI is the
format; the size is checked on restore) and MSRs as (index, value) pairs
checked against KVM's list. Restore order follows what KVM needs: the TSC
frequency and CPUID first, special registers before MSRs, the LAPIC before
events and mp_state.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvmpy.abi import kvm as abi
from kvmpy.kvm import Vcpu, Vm
from kvmpy.kvm.errors import KvmError
from kvmpy.state.errors import StateError

#: CPUID leaves one vCPU may carry (KVM allows 256 in KVM_SET_CPUID2).
MAX_CPUID_ENTRIES = 256
_CPUID_ENTRY_SIZE = ctypes.sizeof(abi.kvm_cpuid_entry2)
#: IA32_TSC_DEADLINE: KVM ignores a write to it unless the local APIC's timer is already in
#: TSC-deadline mode, so it is loaded after the local APIC (before, a restored Linux whose
#: timer was armed never got its next tick: its CPUs idled for ever, RCU stalled).
MSR_IA32_TSC_DEADLINE = 0x6E0


@dataclass(frozen=True, slots=True)
class VcpuState:
    id: int
    tsc_khz: int
    cpuid: bytes  # kvm_cpuid_entry2 records back to back
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    msrs: tuple[tuple[int, int], ...]
    lapic: bytes
    mp_state: int
    events: bytes
    debugregs: bytes


@dataclass(frozen=True, slots=True)
class VmState:
    pic_master: bytes
    pic_slave: bytes
    ioapic: bytes
    pit: bytes
    clock: bytes


def save_vcpu(vcpu: Vcpu, msr_indices: Sequence[int]) -> VcpuState:
    """Everything KVM holds for ``vcpu`` (it must be outside KVM_RUN: paused or not started)."""
    cpuid = vcpu.get_cpuid()
    return VcpuState(
        id=vcpu.id,
        tsc_khz=vcpu.get_tsc_khz(),
        cpuid=b"".join(bytes(entry) for entry in cpuid),
        regs=bytes(vcpu.get_regs()),
        sregs=bytes(vcpu.get_sregs()),
        xsave=bytes(vcpu.get_xsave()),
        xcrs=bytes(vcpu.get_xcrs()),
        msrs=tuple(sorted(vcpu.get_all_msrs(msr_indices).items())),
        lapic=bytes(vcpu.get_lapic()),
        mp_state=vcpu.get_mp_state(),
        events=bytes(vcpu.get_vcpu_events()),
        debugregs=bytes(vcpu.get_debugregs()),
    )


def restore_vcpu(vcpu: Vcpu, state: VcpuState, msr_indices: Sequence[int]) -> None:
    """Load ``state`` into ``vcpu`` after checking it; StateError names what is wrong."""
    check_vcpu_state(state, msr_indices)
    what = f"vCPU {state.id}"
    _apply(what, "TSC frequency", lambda: vcpu.set_tsc_khz(state.tsc_khz) if state.tsc_khz else None)
    entries = [
        abi.kvm_cpuid_entry2.from_buffer_copy(state.cpuid, offset)
        for offset in range(0, len(state.cpuid), _CPUID_ENTRY_SIZE)
    ]
    _apply(what, "CPUID", lambda: vcpu.set_cpuid(entries))
    _apply(what, "special registers", lambda: vcpu.set_sregs(_struct(abi.kvm_sregs, state.sregs)))
    _apply(what, "registers", lambda: vcpu.set_regs(_struct(abi.kvm_regs, state.regs)))
    _apply(what, "XSAVE area", lambda: vcpu.set_xsave(_struct(abi.kvm_xsave, state.xsave)))
    _apply(what, "XCRs", lambda: vcpu.set_xcrs(_struct(abi.kvm_xcrs, state.xcrs)))
    msrs = [(index, value) for index, value in state.msrs if index != MSR_IA32_TSC_DEADLINE]
    deadline = [(index, value) for index, value in state.msrs if index == MSR_IA32_TSC_DEADLINE]
    _apply(what, "MSRs", lambda: vcpu.set_msrs(msrs))
    _apply(what, "local APIC", lambda: vcpu.set_lapic(_struct(abi.kvm_lapic_state, state.lapic)))
    _apply(what, "TSC deadline", lambda: vcpu.set_msrs(deadline) if deadline else None)
    _apply(what, "mp_state", lambda: vcpu.set_mp_state(state.mp_state))
    _apply(what, "pending events", lambda: vcpu.set_vcpu_events(_struct(abi.kvm_vcpu_events, state.events)))
    _apply(what, "debug registers", lambda: vcpu.set_debugregs(_struct(abi.kvm_debugregs, state.debugregs)))


def check_vcpu_state(state: VcpuState, msr_indices: Sequence[int]) -> None:
    """Sizes, counts and MSR indices, before anything reaches KVM."""
    what = f"vCPU {state.id}"
    _check_size(what, "registers", state.regs, abi.kvm_regs)
    _check_size(what, "special registers", state.sregs, abi.kvm_sregs)
    _check_size(what, "XSAVE area", state.xsave, abi.kvm_xsave)
    _check_size(what, "XCRs", state.xcrs, abi.kvm_xcrs)
    _check_size(what, "local APIC", state.lapic, abi.kvm_lapic_state)
    _check_size(what, "pending events", state.events, abi.kvm_vcpu_events)
    _check_size(what, "debug registers", state.debugregs, abi.kvm_debugregs)
    if len(state.cpuid) % _CPUID_ENTRY_SIZE or len(state.cpuid) > MAX_CPUID_ENTRIES * _CPUID_ENTRY_SIZE:
        raise StateError(f"{what}: CPUID of {len(state.cpuid)} bytes is not a list of at most "
                         f"{MAX_CPUID_ENTRIES} entries")
    if not 0 <= state.tsc_khz < 1 << 32:
        raise StateError(f"{what}: TSC frequency {state.tsc_khz} kHz is out of range")
    if not 0 <= state.mp_state <= 8:
        raise StateError(f"{what}: mp_state {state.mp_state} is not one KVM defines")
    known = set(msr_indices)
    for index, value in state.msrs:
        if index not in known:
            raise StateError(f"{what}: MSR {index:#x} is not one this host's KVM saves and restores")
        if not 0 <= value < 1 << 64:
            raise StateError(f"{what}: MSR {index:#x} value is out of range")


def save_vm(vm: Vm) -> VmState:
    return VmState(
        pic_master=bytes(vm.get_irqchip(abi.KVM_IRQCHIP_PIC_MASTER)),
        pic_slave=bytes(vm.get_irqchip(abi.KVM_IRQCHIP_PIC_SLAVE)),
        ioapic=bytes(vm.get_irqchip(abi.KVM_IRQCHIP_IOAPIC)),
        pit=bytes(vm.get_pit2()),
        clock=bytes(vm.get_clock()),
    )


def restore_vm(vm: Vm, state: VmState, clock_realtime: bool = False) -> None:
    """The in-kernel devices and kvmclock; the chip ids inside the saved chips are checked.

    ``clock_realtime``: KVM moves kvmclock on by the host's realtime elapsed since the save
    (the saved clock carries the host's realtime then), so the guest's wall clock is current.
    """
    chips = (
        ("PIC master", state.pic_master, abi.KVM_IRQCHIP_PIC_MASTER),
        ("PIC slave", state.pic_slave, abi.KVM_IRQCHIP_PIC_SLAVE),
        ("IOAPIC", state.ioapic, abi.KVM_IRQCHIP_IOAPIC),
    )
    for name, data, chip_id in chips:
        chip = _struct(abi.kvm_irqchip, _check_size("VM", name, data, abi.kvm_irqchip))
        if chip.chip_id != chip_id:
            raise StateError(f"VM: the saved {name} says it is chip {chip.chip_id}")
        _apply("VM", name, lambda chip=chip: vm.set_irqchip(chip))  # type: ignore[misc]
    pit = _struct(abi.kvm_pit_state2, _check_size("VM", "PIT", state.pit, abi.kvm_pit_state2))
    _apply("VM", "PIT", lambda: vm.set_pit2(pit))
    clock = _struct(abi.kvm_clock_data, _check_size("VM", "kvmclock", state.clock, abi.kvm_clock_data))
    if clock_realtime and not clock.flags & abi.KVM_CLOCK_REALTIME:
        raise StateError("the snapshot's kvmclock has no realtime stamp (its host's KVM gave none)")
    # The clock value, and the realtime stamp if asked for; the host TSC is this host's to decide.
    clock.flags = abi.KVM_CLOCK_REALTIME if clock_realtime else 0
    _apply("VM", "kvmclock", lambda: vm.set_clock(clock))


def _check_size(what: str, part: str, data: bytes, ctype: Any) -> bytes:
    if len(data) != ctypes.sizeof(ctype):
        expected = ctypes.sizeof(ctype)
        raise StateError(f"{what}: saved {part} is {len(data)} bytes, this kvmpy expects {expected}")
    return data


def _struct(ctype: Any, data: bytes) -> Any:
    return ctype.from_buffer_copy(data)


def _apply(what: str, part: str, load: Callable[[], object]) -> None:
    try:
        load()
    except KvmError as error:
        raise StateError(f"{what}: KVM refused the saved {part}: {error}") from None


__all__ = [
    "VcpuState",
    "VmState",
    "check_vcpu_state",
    "restore_vcpu",
    "restore_vm",
    "save_vcpu",
    "save_vm",
]
