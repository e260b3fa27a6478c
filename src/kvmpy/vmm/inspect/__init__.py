"""The monitor: answers to questions about a live guest, as JSON-ready dicts.

``answer(machine, action)`` takes one of the monitor actions of
:mod:`kvmpy.vmm.actions` (GetRegisters, TranslateAddress, ReadMemory,
GetMemoryTree, GetIrqState, GetVcpus, GetStats) and returns plain data that
the API serves under ``/kvmpy/`` and ``kvmpy ctl`` prints. vCPU state is
always read through ``Machine.on_vcpu`` (on the vCPU's own thread while it
runs); guest memory only through GuestMemory. Everything read from the guest
is treated as untrusted: walks are bounded, reads are bounded and checked.
A request that cannot be answered raises ActionError with a one-line reason.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from kvmpy.errors import KvmpyError
from kvmpy.kvm import Vcpu
from kvmpy.vmm import actions
from kvmpy.vmm.actions import ActionError
from kvmpy.vmm.inspect.activity import machine_stats, stats_dict, vcpus
from kvmpy.vmm.inspect.addresses import MAX_READ, on_vcpu, read_memory, translate
from kvmpy.vmm.inspect.interrupts import irq_state
from kvmpy.vmm.inspect.memory_tree import memory_tree
from kvmpy.vmm.inspect.registers import describe

if TYPE_CHECKING:
    from kvmpy.vmm.machine import Machine


def registers(machine: Machine, vcpu_index: int = 0) -> dict[str, Any]:
    def read(vcpu: Vcpu) -> dict[str, Any]:
        return describe(vcpu.id, vcpu.get_regs(), vcpu.get_sregs())

    result: dict[str, Any] = on_vcpu(machine, vcpu_index, read)
    return result


def machine_state(machine: Machine) -> str:
    """The lifecycle state as far as the machine itself can tell (the Vmm knows better)."""
    if machine.paused:
        return "Paused"
    if any(thread.is_alive() for thread in machine.threads):
        return "Running"
    return "Stopped" if machine.threads else "Not started"


def answer(
    machine: Machine, action: Any, *, vm_state: str | None = None, started_at: float | None = None
) -> dict[str, Any]:
    """The monitor's answer to ``action``.

    ``vm_state`` is the VMM's lifecycle state (Firecracker's names: "Running", "Paused"...;
    by default what the machine can tell); ``started_at`` is the ``time.monotonic()`` at
    which the VM started, for the stats' wall time (without it the wall time reads 0).
    """
    if vm_state is None:
        vm_state = machine_state(machine)
    try:
        match action:
            case actions.GetRegisters(vcpu=vcpu):
                return registers(machine, vcpu)
            case actions.TranslateAddress(gva=gva, vcpu=vcpu):
                return translate(machine, gva, vcpu)
            case actions.ReadMemory(address=address, length=length, physical=physical, vcpu=vcpu):
                return read_memory(machine, address, length, physical, vcpu)
            case actions.GetMemoryTree():
                return memory_tree(machine)
            case actions.GetIrqState():
                return irq_state(machine)
            case actions.GetVcpus():
                return vcpus(machine, vm_state)
            case actions.GetStats():
                wall = time.monotonic() - started_at if started_at is not None else 0.0
                result = stats_dict(machine_stats(machine, wall))
                result["vm_state"] = vm_state
                return result
    except ActionError:
        raise
    except KvmpyError as error:  # a failed ioctl or a guest error: the request fails, the VM goes on
        raise ActionError(f"{type(action).__name__}: {error}") from None
    raise ActionError(f"{type(action).__name__} is not a monitor request")


__all__ = ["MAX_READ", "answer", "machine_state", "read_memory", "registers", "translate"]
