"""``regs``: a vCPU's registers with every flag named, its privilege level and paging mode.

What QEMU's ``info registers`` shows, as plain data: general registers,
RFLAGS, segments (the hidden part too: base, limit, type, DPL, L/D/G), the
descriptor tables, control registers and EFER, decoded by the names in the
Intel SDM, so a reader sees "PG PE WP" and "LME LMA NXE" instead of hex.
"""

from __future__ import annotations

from typing import Any

from kvmpy.abi import kvm as abi
from kvmpy.memory.page_walk import CR0_PG, paging_mode

GENERAL_REGISTERS = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip",
)  # fmt: skip
SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")

#: Bit -> name for each register whose flags are decoded (SDM vol. 3A 2.5, 2.2.1; vol. 1 3.4.3).
CR0_FLAGS = {
    0: "PE",
    1: "MP",
    2: "EM",
    3: "TS",
    4: "ET",
    5: "NE",
    16: "WP",
    18: "AM",
    29: "NW",
    30: "CD",
    31: "PG",
}
CR4_FLAGS = {
    0: "VME", 1: "PVI", 2: "TSD", 3: "DE", 4: "PSE", 5: "PAE", 6: "MCE", 7: "PGE", 8: "PCE",
    9: "OSFXSR", 10: "OSXMMEXCPT", 11: "UMIP", 12: "LA57", 13: "VMXE", 14: "SMXE", 16: "FSGSBASE",
    17: "PCIDE", 18: "OSXSAVE", 19: "KL", 20: "SMEP", 21: "SMAP", 22: "PKE", 23: "CET", 24: "PKS",
    25: "UINTR", 28: "LAM_SUP",
}  # fmt: skip
EFER_FLAGS = {0: "SCE", 8: "LME", 10: "LMA", 11: "NXE", 12: "SVME", 13: "LMSLE", 14: "FFXSR", 15: "TCE"}
RFLAGS_FLAGS = {
    0: "CF", 2: "PF", 4: "AF", 6: "ZF", 7: "SF", 8: "TF", 9: "IF", 10: "DF", 11: "OF", 14: "NT",
    16: "RF", 17: "VM", 18: "AC", 19: "VIF", 20: "VIP", 21: "ID",
}  # fmt: skip
CR3_FLAGS = {3: "PWT", 4: "PCD"}
APIC_BASE_FLAGS = {8: "BSP", 10: "EXTD", 11: "EN"}

_SYSTEM_TYPES = {
    0x1: "16-bit TSS (available)",
    0x2: "LDT",
    0x3: "16-bit TSS (busy)",
    0x9: "TSS (available)",
    0xB: "TSS (busy)",
    0xC: "call gate",
    0xE: "interrupt gate",
    0xF: "trap gate",
}


def flag_names(value: int, names: dict[int, str]) -> list[str]:
    """The names of the bits of ``value`` that are set, lowest bit first."""
    return [name for bit, name in sorted(names.items()) if value >> bit & 1]


def segment_type_name(type_: int, code_or_data: bool) -> str:
    """The descriptor type as the SDM's tables 3-1 and 3-2 name it."""
    if not code_or_data:
        return _SYSTEM_TYPES.get(type_, f"system type {type_:#x}")
    if type_ & 0x8:
        words = (
            ["code", "execute"] + (["read"] if type_ & 0x2 else []) + (["conforming"] if type_ & 0x4 else [])
        )
    else:
        words = (
            ["data", "read"] + (["write"] if type_ & 0x2 else []) + (["expand-down"] if type_ & 0x4 else [])
        )
    if type_ & 0x1:
        words.append("accessed")
    return " ".join(words)


def segment(seg: abi.kvm_segment) -> dict[str, Any]:
    return {
        "selector": int(seg.selector),
        "base": int(seg.base),
        "limit": int(seg.limit),
        "type": int(seg.type),
        "type_name": segment_type_name(int(seg.type), bool(seg.s)),
        "s": bool(seg.s),
        "dpl": int(seg.dpl),
        "present": bool(seg.present),
        "l": bool(seg.l),
        "db": bool(seg.db),
        "g": bool(seg.g),
        "avl": bool(seg.avl),
        "unusable": bool(seg.unusable),
    }


def cpu_mode(sregs: abi.kvm_sregs) -> str:
    """Real, protected, compatibility or 64-bit mode, from CR0.PE, EFER.LMA and CS.L/D."""
    if not sregs.cr0 & 1:
        return "real mode"
    if sregs.efer & (1 << 10):
        return "64-bit mode" if sregs.cs.l else "compatibility mode"
    return "32-bit protected mode" if sregs.cs.db else "16-bit protected mode"


def current_privilege_level(sregs: abi.kvm_sregs) -> int:
    """CPL: 0 in real mode, else SS.DPL (which the SDM keeps equal to CPL, and KVM reads)."""
    if not sregs.cr0 & 1:
        return 0
    return int(sregs.ss.dpl)


def describe(vcpu_index: int, regs: abi.kvm_regs, sregs: abi.kvm_sregs) -> dict[str, Any]:
    """The registers of one vCPU as JSON-ready data."""
    rflags = int(regs.rflags)
    mode = paging_mode(sregs.cr0, sregs.cr4, sregs.efer)
    return {
        "vcpu": vcpu_index,
        "general": {name: int(getattr(regs, name)) for name in GENERAL_REGISTERS},
        "rflags": {"value": rflags, "flags": flag_names(rflags, RFLAGS_FLAGS), "iopl": rflags >> 12 & 3},
        "segments": {name: segment(getattr(sregs, name)) for name in SEGMENTS},
        "descriptor_tables": {
            name: {"base": int(getattr(sregs, name).base), "limit": int(getattr(sregs, name).limit)}
            for name in ("gdt", "idt")
        },
        "control": {
            "cr0": {"value": int(sregs.cr0), "flags": flag_names(sregs.cr0, CR0_FLAGS)},
            "cr2": {"value": int(sregs.cr2), "flags": []},
            "cr3": {"value": int(sregs.cr3), "flags": flag_names(sregs.cr3, CR3_FLAGS)},
            "cr4": {"value": int(sregs.cr4), "flags": flag_names(sregs.cr4, CR4_FLAGS)},
            "cr8": {"value": int(sregs.cr8), "flags": []},
            "efer": {"value": int(sregs.efer), "flags": flag_names(sregs.efer, EFER_FLAGS)},
            "apic_base": {
                "value": int(sregs.apic_base),
                "flags": flag_names(sregs.apic_base, APIC_BASE_FLAGS),
            },
        },
        "cpl": current_privilege_level(sregs),
        "cpu_mode": cpu_mode(sregs),
        "paging": bool(sregs.cr0 & CR0_PG),
        "paging_mode": mode.value,
    }


__all__ = ["cpu_mode", "current_privilege_level", "describe", "flag_names", "segment_type_name"]
