"""``translate`` and ``x``: the lecture's address chain on a live guest, and memory dumps.

GVA -> GPA is the guest's own page-table walk (kvmpy.memory.page_walk, from
the vCPU's CR3); GPA -> HVA is the KVM memory slot that holds the address
(slots map guest-physical ranges onto the VMM's own mappings); HVA -> HPA is
the host kernel's page tables, read from /proc/self/pagemap. KVM's own
answer (KVM_TRANSLATE) goes beside kvmpy's, so the two walks check each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmpy.abi import kvm as abi
from kvmpy.errors import KvmpyError
from kvmpy.kvm import Vcpu
from kvmpy.memory.guest_memory import GuestMemory, GuestMemoryError
from kvmpy.memory.host_pages import host_frame
from kvmpy.memory.page_walk import DEFAULT_MAX_PHYS_BITS, PagingContext, Walk, walk
from kvmpy.vmm.actions import ActionError

if TYPE_CHECKING:
    from kvmpy.vmm.machine import Machine

#: The most ``x`` reads at once: one page. A dump is for reading by eye (256 lines of
#: 16 bytes); bulk copies of guest memory are what snapshots are for.
MAX_READ = 4096
_PAGE = 4096


@dataclass(frozen=True, slots=True)
class VcpuPaging:
    """What a translation needs from the vCPU, read on its thread in one visit."""

    context: PagingContext
    kvm: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PagingFeatures:
    """The CPUID facts that decide which entry bits are reserved."""

    max_phys_bits: int = DEFAULT_MAX_PHYS_BITS
    gib_pages: bool = True


def paging_features(machine: Machine) -> PagingFeatures:
    """MAXPHYADDR (CPUID 0x80000008 EAX[7:0]) and 1 GiB pages (0x80000001 EDX[26]) as KVM
    offers them, which is what kvmpy gives the guest."""
    bits, gib_pages = DEFAULT_MAX_PHYS_BITS, True
    for entry in machine.system.supported_cpuid():
        if entry.function == 0x8000_0008 and 32 <= int(entry.eax) & 0xFF <= 52:
            bits = int(entry.eax) & 0xFF
        elif entry.function == 0x8000_0001:
            gib_pages = bool(int(entry.edx) >> 26 & 1)
    return PagingFeatures(bits, gib_pages)


def kvm_translate(vcpu: Vcpu, gva: int) -> dict[str, Any]:
    """KVM_TRANSLATE's answer as data: KVM walks the same tables in the kernel.

    Only ``valid`` and the GPA carry information: x86 KVM sets ``writeable`` to 1 and
    ``usermode`` to 0 whatever the tables say, so they are left out.
    """
    try:
        answer: abi.kvm_translation = vcpu.translate(gva)
    except KvmpyError as error:
        return {"valid": None, "gpa": None, "error": str(error)}
    return {"valid": bool(answer.valid), "gpa": int(answer.physical_address) if answer.valid else None}


def _paging(machine: Machine, vcpu_index: int, gva: int | None) -> VcpuPaging:
    features = paging_features(machine)

    def read(vcpu: Vcpu) -> VcpuPaging:
        sregs = vcpu.get_sregs()
        context = PagingContext.from_registers(
            sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, features.max_phys_bits, features.gib_pages
        )
        return VcpuPaging(context, kvm_translate(vcpu, gva) if gva is not None else {})

    return on_vcpu(machine, vcpu_index, read)


def on_vcpu(machine: Machine, index: int, work: Callable[[Vcpu], Any]) -> Any:
    """``machine.on_vcpu``, with a request for a vCPU that does not exist refused cleanly."""
    if not 0 <= index < len(machine.vcpus):
        raise ActionError(f"there is no vCPU {index}: this VM has vCPUs 0-{len(machine.vcpus) - 1}")
    return machine.on_vcpu(index, work)


def memory_slot(machine: Machine, gpa: int) -> dict[str, Any] | None:
    """The KVM memory slot holding ``gpa``, with the HVA the address lands at."""
    for slot in machine.vm.memory_slots.values():
        if slot.guest_phys_addr <= gpa < slot.guest_phys_addr + slot.size:
            return {
                "slot": slot.slot,
                "gpa_start": slot.guest_phys_addr,
                "gpa_end": slot.guest_phys_addr + slot.size,
                "host_address": slot.host_address,
                "flags": slot_flag_names(slot.flags),
                "hva": slot.host_address + (gpa - slot.guest_phys_addr),
            }
    return None


def slot_flag_names(flags: int) -> list[str]:
    names = {abi.KVM_MEM_LOG_DIRTY_PAGES: "dirty-logging", abi.KVM_MEM_READONLY: "readonly"}
    return [name for bit, name in names.items() if flags & bit]


def _device_at(machine: Machine, gpa: int) -> str | None:
    entry = machine.mmio_bus.find(gpa)
    return entry.name if entry is not None else None


def translate(machine: Machine, gva: int, vcpu_index: int = 0) -> dict[str, Any]:
    """GVA -> GPA (kvmpy's walk and KVM's) -> memory slot and HVA -> host frame."""
    paging = _paging(machine, vcpu_index, gva)
    result: Walk = walk(machine.memory, gva, paging.context)
    answer: dict[str, Any] = {
        "vcpu": vcpu_index,
        "gva": gva,
        "mode": result.mode.value,
        "walk": result.as_dict(),
        "gpa": result.gpa,
        "kvm": paging.kvm,
        "agrees_with_kvm": None,
        "slot": None,
        "device": None,
        "hva": None,
        "host_frame": None,
    }
    if paging.kvm.get("valid") is not None:
        answer["agrees_with_kvm"] = paging.kvm["gpa"] == result.gpa
    if result.gpa is None:
        return answer
    slot = memory_slot(machine, result.gpa)
    if slot is None:
        answer["device"] = _device_at(machine, result.gpa)
        return answer
    answer["slot"] = slot
    answer["hva"] = slot["hva"]
    answer["host_frame"] = host_frame(slot["hva"]).as_dict()
    return answer


def _read_physical(memory: GuestMemory, machine: Machine, gpa: int, length: int) -> bytes:
    try:
        return memory.read(gpa, length)
    except GuestMemoryError:
        device = _device_at(machine, gpa)
        where = f" (it is {device}'s MMIO; reading it would be a device access)" if device else ""
        raise ActionError(f"GPA {gpa:#x}+{length:#x} is not guest RAM{where}") from None


def read_memory(
    machine: Machine, address: int, length: int, physical: bool = False, vcpu_index: int = 0
) -> dict[str, Any]:
    """``length`` bytes at a GPA, or at a GVA through the vCPU's page tables page by page."""
    if not 0 < length <= MAX_READ:
        raise ActionError(f"length {length} is out of range: read 1 to {MAX_READ} bytes (one page) at a time")
    if address < 0 or address + length > 1 << 64:
        raise ActionError(f"address {address:#x}+{length:#x} is not a 64-bit address range")
    pieces: list[dict[str, Any]] = []
    data = bytearray()
    if physical:
        data += _read_physical(machine.memory, machine, address, length)
        pieces.append({"gva": None, "gpa": address, "length": length})
    else:
        context = _paging(machine, vcpu_index, None).context
        position = address
        while position < address + length:
            chunk = min(address + length, (position // _PAGE + 1) * _PAGE) - position
            result = walk(machine.memory, position, context)
            if result.gpa is None:
                raise ActionError(f"GVA {position:#x} has no translation: {result.fault}")
            data += _read_physical(machine.memory, machine, result.gpa, chunk)
            pieces.append({"gva": position, "gpa": result.gpa, "length": chunk})
            position += chunk
    return {
        "address": address,
        "length": length,
        "physical": physical,
        "vcpu": vcpu_index,
        "data": data.hex(),
        "pages": pieces,
    }


__all__ = ["MAX_READ", "kvm_translate", "memory_slot", "on_vcpu", "read_memory", "translate"]
