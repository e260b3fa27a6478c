"""Typed VM exits: what ``Vcpu.run()`` returns instead of the raw ``kvm_run`` union.

Each exit is a small dataclass, frozen except for the two taken thousands of
times a second (a frozen dataclass pays a setattr call per field). Port I/O and MMIO exits carry a
``memoryview`` into the shared ``kvm_run`` page: for an OUT or MMIO write it
holds the bytes the guest wrote, for an IN or MMIO read the handler fills it
and the value reaches the guest on the next ``run()``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class PortIo:
    """IN/OUT (or INS/OUTS) to an I/O port: ``count`` accesses of ``size`` bytes."""

    port: int
    size: int
    count: int
    is_write: bool
    data: memoryview

    reason = "io"


@dataclass(slots=True)
class Mmio:
    """A load or store to a guest-physical address that is not RAM."""

    address: int
    is_write: bool
    data: memoryview

    reason = "mmio"


@dataclass(frozen=True, slots=True)
class Halt:
    """HLT executed (only seen when the local APIC is not in the kernel)."""

    reason = "hlt"


@dataclass(frozen=True, slots=True)
class Shutdown:
    """The guest triple-faulted (or otherwise asked for a CPU reset)."""

    reason = "shutdown"


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """PSCI-style system events: shutdown, reset, crash."""

    type: int
    data: tuple[int, ...]

    reason = "system_event"


@dataclass(frozen=True, slots=True)
class InternalError:
    """KVM could not handle something in the guest (e.g. emulation failure)."""

    suberror: int
    data: tuple[int, ...]

    reason = "internal_error"


@dataclass(frozen=True, slots=True)
class FailEntry:
    """VM entry failed: the vCPU state is invalid for hardware."""

    hardware_reason: int
    cpu: int

    reason = "fail_entry"


@dataclass(frozen=True, slots=True)
class Interrupted:
    """KVM_RUN returned early because of a signal or ``immediate_exit``."""

    reason = "interrupted"


@dataclass(frozen=True, slots=True)
class IrqWindowOpen:
    """The guest can take an interrupt now (requested with request_interrupt_window)."""

    reason = "irq_window_open"


@dataclass(frozen=True, slots=True)
class Exception_:
    """A guest exception exited to userspace (real mode exceptions, debug)."""

    exception: int
    error_code: int

    reason = "exception"


@dataclass(frozen=True, slots=True)
class UnknownExit:
    """An exit reason kvmpy does not decode."""

    exit_reason: int
    hardware_reason: int

    reason = "unknown"


VmExit = (
    PortIo
    | Mmio
    | Halt
    | Shutdown
    | SystemEvent
    | InternalError
    | FailEntry
    | Interrupted
    | IrqWindowOpen
    | Exception_
    | UnknownExit
)

__all__ = [
    "Exception_",
    "FailEntry",
    "Halt",
    "InternalError",
    "Interrupted",
    "IrqWindowOpen",
    "Mmio",
    "PortIo",
    "Shutdown",
    "SystemEvent",
    "UnknownExit",
    "VmExit",
]
