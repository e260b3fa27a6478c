"""Thin, typed wrappers over the KVM ioctl API: System, Vm, Vcpu and exits."""

from kvmpy.kvm import exits
from kvmpy.kvm.errors import KvmError, KvmUnavailableError
from kvmpy.kvm.system import System
from kvmpy.kvm.vcpu import Vcpu
from kvmpy.kvm.vm import IrqchipRoute, MsiRoute, Vm

__all__ = ["IrqchipRoute", "KvmError", "KvmUnavailableError", "MsiRoute", "System", "Vcpu", "Vm", "exits"]
