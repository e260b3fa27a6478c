"""What this host's KVM can do: run stock kernels, or only ring-3-heavy guests (PVM)."""

from __future__ import annotations

import os


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def kvm_runs_stock_kernels() -> bool:
    """True when /dev/kvm is backed by VT-x or AMD-V.

    A KVM without them (PVM, which emulates guest ring 0 and lacks
    instructions stock kernels use) cannot boot a distribution kernel; kvmpy
    then boots Linux inside the lab instead.
    """
    return os.path.exists("/dev/kvm") and bool(cpu_flags() & {"vmx", "svm"})


__all__ = ["cpu_flags", "kvm_runs_stock_kernels"]
