"""The monitor's decoders on hand-made register values (no /dev/kvm needed)."""

from __future__ import annotations

import struct

from kvmpy.abi import kvm as abi
from kvmpy.kvm import MsiRoute
from kvmpy.memory.host_pages import decode_entry, has_cap_sys_admin
from kvmpy.vmm.exit_stats import VcpuExitStats
from kvmpy.vmm.inspect.activity import snapshot, vcpu_state
from kvmpy.vmm.inspect.interrupts import ioapic_pin, lapic, msi_route
from kvmpy.vmm.inspect.registers import (
    CR0_FLAGS,
    EFER_FLAGS,
    cpu_mode,
    current_privilege_level,
    flag_names,
    segment_type_name,
)


def test_flag_names_in_bit_order() -> None:
    assert flag_names(0x8001_0011, CR0_FLAGS) == ["PE", "ET", "WP", "PG"]
    assert flag_names(0xD01, EFER_FLAGS) == ["SCE", "LME", "LMA", "NXE"]


def test_segment_types() -> None:
    assert segment_type_name(0xB, True) == "code execute read accessed"
    assert segment_type_name(0x3, True) == "data read write accessed"
    assert segment_type_name(0x4, True) == "data read expand-down"
    assert segment_type_name(0xB, False) == "TSS (busy)"
    assert segment_type_name(0x5, False) == "system type 0x5"


def test_cpu_mode_and_cpl() -> None:
    sregs = abi.kvm_sregs()
    assert cpu_mode(sregs) == "real mode" and current_privilege_level(sregs) == 0
    sregs.cr0, sregs.cs.db = 1, 1
    sregs.ss.dpl = 3
    assert cpu_mode(sregs) == "32-bit protected mode" and current_privilege_level(sregs) == 3
    sregs.efer, sregs.cs.l, sregs.cs.db = 1 << 10, 1, 0
    assert cpu_mode(sregs) == "64-bit mode"
    sregs.cs.l = 0
    assert cpu_mode(sregs) == "compatibility mode"


def test_ioapic_redirection_entry() -> None:
    bits = 0x31 | 1 << 11 | 1 << 13 | 1 << 15 | 1 << 16 | 0x02 << 56
    pin = ioapic_pin(4, bits)
    assert pin == {
        "pin": 4,
        "vector": 0x31,
        "delivery_mode": "fixed",
        "dest_mode": "logical",
        "delivery_pending": False,
        "polarity": "low",
        "remote_irr": False,
        "trigger": "level",
        "masked": True,
        "destination": 2,
    }
    assert ioapic_pin(0, 0x7 << 8)["delivery_mode"] == "ExtINT"


def test_msi_message() -> None:
    route = msi_route(MsiRoute(gsi=25, address=0xFEE0_1000, data=0x4041))
    assert (route["destination"], route["vector"], route["trigger"], route["dest_mode"]) == (
        1,
        0x41,
        "edge",
        "physical",
    )


def test_lapic_page() -> None:
    page = bytearray(1024)

    def put(offset: int, value: int) -> None:
        struct.pack_into("<I", page, offset, value)

    put(0x20, 2 << 24)  # ID 2 (xAPIC: bits 31:24)
    put(0x80, 0x20)  # TPR
    put(0xF0, 0x1FF)  # enabled, spurious vector 0xFF
    put(0x100 + 0x10 * 1, 1 << 3)  # ISR: vector 35
    put(0x200 + 0x10 * 7, 1 << 31)  # IRR: vector 255
    put(0x320, 0xEC | 1 << 17)  # periodic timer on vector 0xEC
    put(0x380, 100000)
    put(0x3E0, 0b1011)  # divide by 1
    state = lapic(1, bytes(page), apic_base=0xFEE0_0900)
    assert (state["id"], state["tpr"], state["enabled"], state["spurious_vector"]) == (2, 0x20, True, 0xFF)
    assert state["isr"] == [35] and state["irr"] == [255]
    timer = state["timer"]
    assert (timer["mode"], timer["vector"], timer["masked"], timer["divide"]) == ("periodic", 0xEC, False, 1)
    assert timer["initial_count"] == 100000
    put(0x3E0, 0b0011)  # divide by 16
    assert lapic(1, bytes(page), apic_base=0)["timer"]["divide"] == 16
    assert lapic(1, bytes(page), apic_base=1 << 10)["id"] == 2 << 24  # x2APIC: the full register


def test_vcpu_state_names() -> None:
    assert vcpu_state(abi.KVM_MP_STATE_RUNNABLE, True, "Running") == "running"
    assert vcpu_state(abi.KVM_MP_STATE_HALTED, True, "Running") == "halted"
    assert vcpu_state(abi.KVM_MP_STATE_UNINITIALIZED, True, "Running") == "waiting for SIPI"
    assert vcpu_state(abi.KVM_MP_STATE_RUNNABLE, True, "Paused") == "paused"
    assert vcpu_state(abi.KVM_MP_STATE_RUNNABLE, False, "Not started") == "not started"
    assert vcpu_state(abi.KVM_MP_STATE_RUNNABLE, False, "Running") == "stopped"


def test_stats_snapshot_is_a_copy() -> None:
    live = VcpuExitStats(0)
    live.record("io", 1000, 50)
    live.guest_errors = 2
    copy = snapshot(live)
    live.record("io", 1000, 50)
    live.record("mmio", 1000, 50)
    live.guest_errors = 3
    assert (copy.total_exits, copy.guest_ns, list(copy.reasons), copy.guest_errors) == (1, 1000, ["io"], 2)


def test_pagemap_entries() -> None:
    present = 1 << 63 | 1 << 56 | 0x1234
    frame = decode_entry(0x7000_0123, present, privileged=True)
    assert frame.pfn == 0x1234 and frame.hpa == 0x1234 * 4096 + 0x123 and frame.exclusive
    hidden = decode_entry(0x7000_0123, 1 << 63, privileged=False)
    assert hidden.pfn is None and str(hidden.note).startswith("hidden by the host")
    assert "CAP_SYS_ADMIN" in str(hidden.note)
    untouched = decode_entry(0x7000_0000, 0, privileged=True)
    assert not untouched.present and "first touched" in str(untouched.note)
    assert decode_entry(0, 1 << 62 | 5, privileged=True).note == "swapped out by the host"
    assert isinstance(has_cap_sys_admin(), bool)
