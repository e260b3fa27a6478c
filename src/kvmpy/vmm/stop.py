"""Why a VM stopped, and the exit status ``kvmpy run`` turns that into."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class StopKind(Enum):
    POWEROFF = "poweroff"  # ACPI S5 or a KVM shutdown system event
    DEBUG_EXIT = "debug-exit"  # the guest wrote its exit status to the debug-exit port
    RESET = "reset"  # the guest asked for a reboot
    INTERRUPTED = "interrupted"  # Ctrl-C or a signal on the host
    STOPPED = "stopped"  # the host asked through the API or the monitor
    GUEST_ERROR = "guest-error"  # triple fault, internal error, failed entry
    HOST_ERROR = "host-error"  # an ioctl or the VMM itself failed


@dataclass(frozen=True, slots=True)
class StopReason:
    kind: StopKind
    status: int
    message: str = ""
    #: Multi-line details for errors: the vCPU registers, the last console lines.
    details: tuple[str, ...] = field(default=())


__all__ = ["StopKind", "StopReason"]
