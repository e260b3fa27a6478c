"""``irq``: where the guest's interrupts go, from KVM's in-kernel interrupt controllers.

With KVM_CREATE_IRQCHIP the PICs, the IOAPIC and every vCPU's local APIC
live in the kernel; KVM_GET_IRQCHIP and KVM_GET_LAPIC read their state. MSI
routes are the GSI -> message table kvmpy installed (KVM_SET_GSI_ROUTING)
from what the guest wrote into the devices' MSI-X tables. Decoded per the
82093AA IOAPIC datasheet and the SDM's chapter on the local APIC.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from kvmpy.abi import kvm as abi
from kvmpy.kvm import MsiRoute, Vcpu
from kvmpy.vmm.inspect.addresses import on_vcpu

if TYPE_CHECKING:
    from kvmpy.vmm.machine import Machine

DELIVERY_MODES = {0: "fixed", 1: "lowest", 2: "SMI", 4: "NMI", 5: "INIT", 6: "SIPI", 7: "ExtINT"}
TIMER_MODES = {0: "one-shot", 1: "periodic", 2: "TSC-deadline", 3: "reserved"}

# Local APIC register offsets (SDM vol. 3A table 11-1).
APIC_ID = 0x20
APIC_VERSION = 0x30
APIC_TPR = 0x80
APIC_PPR = 0xA0
APIC_LDR = 0xD0
APIC_SVR = 0xF0
APIC_ISR = 0x100
APIC_TMR = 0x180
APIC_IRR = 0x200
APIC_ESR = 0x280
APIC_LVT_TIMER = 0x320
APIC_LVT_LINT0 = 0x350
APIC_LVT_LINT1 = 0x360
APIC_LVT_ERROR = 0x370
APIC_TIMER_INITIAL = 0x380
APIC_TIMER_CURRENT = 0x390
APIC_TIMER_DIVIDE = 0x3E0
_X2APIC_ENABLE = 1 << 10


def ioapic_pin(pin: int, bits: int) -> dict[str, Any]:
    """One IOAPIC redirection-table entry."""
    return {
        "pin": pin,
        "vector": bits & 0xFF,
        "delivery_mode": DELIVERY_MODES.get(bits >> 8 & 7, "reserved"),
        "dest_mode": "logical" if bits >> 11 & 1 else "physical",
        "delivery_pending": bool(bits >> 12 & 1),
        "polarity": "low" if bits >> 13 & 1 else "high",
        "remote_irr": bool(bits >> 14 & 1),
        "trigger": "level" if bits >> 15 & 1 else "edge",
        "masked": bool(bits >> 16 & 1),
        "destination": bits >> 56 & 0xFF,
    }


def ioapic(chip: abi.kvm_irqchip) -> dict[str, Any]:
    state = chip.chip.ioapic
    return {
        "base_address": int(state.base_address),
        "id": int(state.id),
        "irr": int(state.irr),
        "pins": [ioapic_pin(pin, int(entry.bits)) for pin, entry in enumerate(state.redirtbl)],
    }


def pic(chip: abi.kvm_irqchip) -> dict[str, Any]:
    state = chip.chip.pic
    return {
        "irq_base": int(state.irq_base),
        "irr": int(state.irr),
        "imr": int(state.imr),
        "isr": int(state.isr),
        "elcr": int(state.elcr),
        "auto_eoi": bool(state.auto_eoi),
    }


def msi_route(route: MsiRoute) -> dict[str, Any]:
    """A GSI's MSI message, decoded (SDM vol. 3A 11.11: address 0xFEEx_xxxx, data)."""
    return {
        "gsi": route.gsi,
        "address": route.address,
        "data": route.data,
        "destination": route.address >> 12 & 0xFF,
        "dest_mode": "logical" if route.address >> 2 & 1 else "physical",
        "vector": route.data & 0xFF,
        "delivery_mode": DELIVERY_MODES.get(route.data >> 8 & 7, "reserved"),
        "trigger": "level" if route.data >> 15 & 1 else "edge",
    }


def _vectors(registers: bytes, base: int) -> list[int]:
    """The vectors set in a 256-bit APIC bitmap (ISR, IRR, TMR: eight 32-bit registers 16 bytes apart)."""
    vectors = []
    for word in range(8):
        value = struct.unpack_from("<I", registers, base + 0x10 * word)[0]
        vectors += [word * 32 + bit for bit in range(32) if value >> bit & 1]
    return vectors


def _lvt(value: int) -> dict[str, Any]:
    return {
        "value": value,
        "vector": value & 0xFF,
        "delivery_mode": DELIVERY_MODES.get(value >> 8 & 7, "reserved"),
        "masked": bool(value >> 16 & 1),
    }


def lapic(vcpu_index: int, registers: bytes, apic_base: int) -> dict[str, Any]:
    """One local APIC from its KVM_GET_LAPIC register page."""

    def reg(offset: int) -> int:
        return int(struct.unpack_from("<I", registers, offset)[0])

    x2apic = bool(apic_base & _X2APIC_ENABLE)
    timer = reg(APIC_LVT_TIMER)
    divide = reg(APIC_TIMER_DIVIDE)
    divide_code = (divide & 0x3) | (divide >> 1 & 0x4)
    return {
        "vcpu": vcpu_index,
        "id": reg(APIC_ID) if x2apic else reg(APIC_ID) >> 24,
        "x2apic": x2apic,
        "enabled": bool(reg(APIC_SVR) >> 8 & 1),
        "version": reg(APIC_VERSION) & 0xFF,
        "tpr": reg(APIC_TPR) & 0xFF,
        "ppr": reg(APIC_PPR) & 0xFF,
        "spurious_vector": reg(APIC_SVR) & 0xFF,
        "isr": _vectors(registers, APIC_ISR),
        "irr": _vectors(registers, APIC_IRR),
        "tmr": _vectors(registers, APIC_TMR),
        "esr": reg(APIC_ESR),
        "timer": {
            **_lvt(timer),
            "mode": TIMER_MODES[timer >> 17 & 3],
            "initial_count": reg(APIC_TIMER_INITIAL),
            "current_count": reg(APIC_TIMER_CURRENT),
            "divide": 1 if divide_code == 7 else 2 << divide_code,
        },
        "lint0": _lvt(reg(APIC_LVT_LINT0)),
        "lint1": _lvt(reg(APIC_LVT_LINT1)),
        "error": _lvt(reg(APIC_LVT_ERROR)),
    }


def _read_lapic(vcpu: Vcpu) -> tuple[bytes, int]:
    return bytes(vcpu.get_lapic()), int(vcpu.get_sregs().apic_base)


def irq_state(machine: Machine) -> dict[str, Any]:
    lapics = []
    for index in range(len(machine.vcpus)):
        registers, apic_base = on_vcpu(machine, index, _read_lapic)
        lapics.append(lapic(index, registers, apic_base))
    return {
        "pic_master": pic(machine.vm.get_irqchip(abi.KVM_IRQCHIP_PIC_MASTER)),
        "pic_slave": pic(machine.vm.get_irqchip(abi.KVM_IRQCHIP_PIC_SLAVE)),
        "ioapic": ioapic(machine.vm.get_irqchip(abi.KVM_IRQCHIP_IOAPIC)),
        "msi_routes": [msi_route(route) for route in machine.pci.msi_routes()],
        "lapics": lapics,
    }


__all__ = ["ioapic_pin", "irq_state", "lapic", "msi_route"]
