"""The ctypes ABI matches the compiler's layout, and the generated file is current."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmpy.abi import kvm as abi
from kvmpy.abi import kvm_generated

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(kvm_generated.LAYOUT))
def test_struct_layout_matches_the_compiler(name: str) -> None:
    size, offsets = kvm_generated.LAYOUT[name]
    cls = getattr(abi, name)
    assert ctypes.sizeof(cls) == size
    for field, offset in offsets.items():
        assert getattr(cls, field).offset == offset, field


def test_well_known_sizes_and_numbers() -> None:
    assert ctypes.sizeof(abi.kvm_regs) == 144
    assert ctypes.sizeof(abi.kvm_sregs) == 312
    assert ctypes.sizeof(abi.kvm_cpuid_entry2) == 40
    assert abi.kvm_run.io.offset == 32 and abi.kvm_run.mmio.offset == 32
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_GET_API_VERSION == 0xAE00
    assert abi.KVM_EXIT_IO == 2 and abi.KVM_EXIT_MMIO == 6


def test_sized_arrays() -> None:
    cpuid = abi.make_cpuid2(3)
    assert cpuid.nent == 3
    assert ctypes.sizeof(cpuid) == 8 + 3 * 40
    msrs = abi.make_msrs(2)
    assert ctypes.sizeof(msrs) == 8 + 2 * 16
    routing = abi.make_irq_routing(4)
    assert ctypes.sizeof(routing) == 8 + 4 * ctypes.sizeof(abi.kvm_irq_routing_entry)


def test_generated_file_is_up_to_date() -> None:
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").exists():
        pytest.skip("gcc or the kernel UAPI headers (linux-libc-dev) are missing")
    pytest.importorskip("pycparser")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_kvm_abi.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
