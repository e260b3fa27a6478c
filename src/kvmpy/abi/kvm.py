"""The KVM ABI as kvmpy uses it: generated structs and constants, plus sized arrays.

Consumers write ``from kvmpy.abi import kvm as abi`` and then ``abi.kvm_regs()``,
``abi.KVM_RUN`` or ``abi.make_cpuid2(80)``. The structs and constants come
from :mod:`kvmpy.abi.kvm_generated`, produced from the kernel's own headers
by tools/gen_kvm_abi.py; this module adds the variable-length structs, whose
C definitions end in a flexible array that ctypes cannot size by itself.
"""

from __future__ import annotations

import ctypes
from typing import Any

from kvmpy.abi.kvm_generated import *  # noqa: F403
from kvmpy.abi.kvm_generated import (
    kvm_cpuid_entry2,
    kvm_irq_routing_entry,
    kvm_msr_entry,
)


def _sized(name: str, header: list[tuple[str, Any]], array: str, entry: Any, count: int) -> Any:
    """A struct ``header + entry[count]``: the usual ctypes idiom for a flexible array."""
    cls = type(name, (ctypes.Structure,), {"_fields_": [*header, (array, entry * count)]})
    return cls()


def make_cpuid2(count: int) -> Any:
    """struct kvm_cpuid2 with room for ``count`` entries (nent is set to count)."""
    value = _sized(
        "kvm_cpuid2_sized",
        [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)],
        "entries",
        kvm_cpuid_entry2,
        count,
    )
    value.nent = count
    return value


def make_msrs(count: int) -> Any:
    """struct kvm_msrs with room for ``count`` entries."""
    value = _sized(
        "kvm_msrs_sized",
        [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)],
        "entries",
        kvm_msr_entry,
        count,
    )
    value.nmsrs = count
    return value


def make_msr_list(count: int) -> Any:
    """struct kvm_msr_list with room for ``count`` indices (nmsrs is set to count)."""
    value = _sized("kvm_msr_list_sized", [("nmsrs", ctypes.c_uint32)], "indices", ctypes.c_uint32, count)
    value.nmsrs = count
    return value


def make_irq_routing(count: int) -> Any:
    """struct kvm_irq_routing with room for ``count`` entries."""
    value = _sized(
        "kvm_irq_routing_sized",
        [("nr", ctypes.c_uint32), ("flags", ctypes.c_uint32)],
        "entries",
        kvm_irq_routing_entry,
        count,
    )
    value.nr = count
    return value
