"""``mtree``: the guest-physical address space as the VMM built it.

Three kinds of things answer guest addresses: RAM (KVM memory slots: the
guest touches it without any exit), MMIO ranges (every access exits to a
device model, or to an ioeventfd in the kernel) and port-I/O ranges. PCI
BARs are MMIO or port ranges the guest itself placed through configuration
space, so they are listed with where the guest put them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvmpy.bus import Bus
from kvmpy.devices.pci.config_space import NUM_BARS
from kvmpy.vmm.inspect.addresses import slot_flag_names

if TYPE_CHECKING:
    from kvmpy.devices.pci.root import PciRoot
    from kvmpy.vmm.machine import Machine


def memory_slots(machine: Machine) -> list[dict[str, Any]]:
    return [
        {
            "slot": slot.slot,
            "gpa_start": slot.guest_phys_addr,
            "gpa_end": slot.guest_phys_addr + slot.size,
            "size": slot.size,
            "host_address": slot.host_address,
            "flags": slot_flag_names(slot.flags),
        }
        for slot in sorted(machine.vm.memory_slots.values(), key=lambda s: s.guest_phys_addr)
    ]


def bus_ranges(bus: Bus) -> list[dict[str, Any]]:
    return [{"base": r.base, "end": r.end, "size": r.size, "name": r.name} for r in bus.ranges]


def pci_functions(root: PciRoot) -> list[dict[str, Any]]:
    """Each PCI function's BARs: size, kind, where the guest placed them, whether they decode."""
    functions = []
    for slot, function in enumerate(root.slots):
        if function is None:
            continue
        config = function.config
        bars = []
        for index in range(NUM_BARS):
            bar = config.bars[index]
            if bar is None:
                continue
            bars.append(
                {
                    "index": index,
                    "kind": bar.kind.value,
                    "size": bar.size,
                    "prefetchable": bar.prefetchable,
                    "address": config.bar_address(index),
                    "enabled": config.bar_enabled(index),
                }
            )
        functions.append({"slot": slot, "name": root.slot_name(slot), "bars": bars})
    return functions


def iommu_view(machine: Machine) -> list[dict[str, Any]]:
    """Each assigned device's IOMMU domain: the device addresses (IOVA, which kvmpy makes the
    GPA) VFIO maps to kvmpy's host memory, i.e. where the device's DMA lands."""
    return [
        {
            "id": name,
            "bdf": assignment.bdf,
            "iommu_group": assignment.group.number,
            "dma": [
                {"iova_start": m.iova, "iova_end": m.iova + m.size, "size": m.size, "host_address": m.vaddr}
                for m in sorted(assignment.container.mappings, key=lambda m: m.iova)
            ],
        }
        for name, assignment in machine.assigned.items()
    ]


def memory_tree(machine: Machine) -> dict[str, Any]:
    return {
        "slots": memory_slots(machine),
        "mmio": bus_ranges(machine.mmio_bus),
        "pio": bus_ranges(machine.pio_bus),
        "pci": pci_functions(machine.pci.root),
        "iommu": iommu_view(machine),
    }


__all__ = ["bus_ranges", "iommu_view", "memory_slots", "memory_tree", "pci_functions"]
