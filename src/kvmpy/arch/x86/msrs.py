"""Initial MSR values for a vCPU, the way firmware would leave them for the OS."""

from __future__ import annotations

IA32_SYSENTER_CS = 0x174
IA32_SYSENTER_ESP = 0x175
IA32_SYSENTER_EIP = 0x176
IA32_TSC = 0x10
IA32_MISC_ENABLE = 0x1A0
IA32_MTRR_DEF_TYPE = 0x2FF
MSR_STAR = 0xC000_0081
MSR_LSTAR = 0xC000_0082
MSR_CSTAR = 0xC000_0083
MSR_SYSCALL_MASK = 0xC000_0084
MSR_KERNEL_GS_BASE = 0xC000_0102

#: IA32_MISC_ENABLE bit 0: fast string operations (Linux warns when it is off).
MISC_ENABLE_FAST_STRING = 1 << 0
#: MTRRs enabled (bit 11) with write-back (6) as the default memory type:
#: without it Linux would map all RAM uncached.
MTRR_ENABLE_WRITEBACK = (1 << 11) | 6


def boot_msrs() -> list[tuple[int, int]]:
    """(index, value) pairs to set on every vCPU before it first runs."""
    return [
        (IA32_SYSENTER_CS, 0),  # no SYSENTER until the OS sets it up
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),  # likewise for SYSCALL
        (MSR_LSTAR, 0),
        (MSR_CSTAR, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (IA32_TSC, 0),  # all vCPUs start their TSC together
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (IA32_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]


__all__ = ["boot_msrs"]
