"""Interrupt lines that end in KVM's in-kernel irqchip.

Devices get an :class:`~kvmpy.bus.device.InterruptLine`; this is the
implementation that drives a GSI of the in-kernel PIC/IOAPIC with
KVM_IRQ_LINE. It lives in ``vmm`` so that devices never import KVM.
"""

from __future__ import annotations

import threading

from kvmpy.kvm import Vm


class KvmIrqLine:
    """One GSI of the in-kernel irqchip, driven by level."""

    def __init__(self, vm: Vm, gsi: int) -> None:
        self._vm = vm
        self.gsi = gsi
        self._lock = threading.Lock()
        self.raised = 0

    def set_level(self, high: bool) -> None:
        with self._lock:
            if high:
                self.raised += 1
            self._vm.set_irq_line(self.gsi, high)

    def pulse(self) -> None:
        with self._lock:
            self.raised += 1
            self._vm.set_irq_line(self.gsi, True)
            self._vm.set_irq_line(self.gsi, False)


__all__ = ["KvmIrqLine"]
