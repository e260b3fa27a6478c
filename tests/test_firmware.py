"""ACPI tables, the MP table and CPUID: checksums, counts, and what iasl makes of them."""

from __future__ import annotations

import shutil
import struct
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from kvmpy.arch.x86 import aml, layout
from kvmpy.arch.x86.acpi import build_acpi_tables
from kvmpy.arch.x86.cpuid import CpuidEntry, build_guest_cpuid
from kvmpy.arch.x86.mptable import build_mptable
from kvmpy.errors import ConfigError


def tables(n_cpus: int) -> dict[bytes, bytes]:
    result = {}
    for _, blob in build_acpi_tables(n_cpus).blobs:
        result[blob[:8] if blob.startswith(b"RSD PTR") else blob[:4]] = blob
    return result


@pytest.mark.parametrize("n_cpus", [1, 2, 4, 64])
def test_acpi_checksums_and_lengths(n_cpus: int) -> None:
    found = tables(n_cpus)
    for signature in (b"DSDT", b"FACP", b"APIC", b"XSDT"):
        blob = found[signature]
        assert struct.unpack_from("<I", blob, 4)[0] == len(blob)
        assert sum(blob) & 0xFF == 0, signature
    rsdp = found[b"RSD PTR "]
    assert sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0
    madt = found[b"APIC"]
    position, local_apics = 44, []
    while position < len(madt):
        kind, length = madt[position], madt[position + 1]
        if kind == 0:
            local_apics.append(madt[position + 3])
        position += length
    assert local_apics == list(range(n_cpus))


def test_too_many_cpus_for_the_table_area() -> None:
    with pytest.raises(ConfigError):
        build_acpi_tables(254, base=layout.ACPI_TABLES_START, rsdp_at=layout.ACPI_TABLES_START + 0x400)


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools) is not installed")
def test_iasl_disassembles_without_errors(tmp_path: Path) -> None:
    for signature, blob in tables(4).items():
        if signature.startswith(b"RSD") or signature == b"FACS":  # no standard header to disassemble
            continue
        path = tmp_path / f"{signature.decode()}.dat"
        path.write_bytes(blob)
        done = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True, cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
    dsdt = (tmp_path / "DSDT.dsl").read_text()
    assert "_S5_" in dsdt and "PNP0501" in dsdt
    assert "PM1A Control Block Address : 00000604" in (tmp_path / "FACP.dsl").read_text()


def test_aml_package_length_encoding() -> None:
    assert aml.pkg_length(10) == bytes([11])
    assert aml.pkg_length(62) == bytes([63])
    encoded = aml.pkg_length(63)  # 63 + 2 bytes of length = 65
    assert encoded == bytes([0x41, 0x04])


@pytest.mark.parametrize("n_cpus", [1, 3, 16])
def test_mptable(n_cpus: int) -> None:
    blob = build_mptable(n_cpus)
    pointer, table = blob[:16], blob[16:]
    assert pointer[:4] == b"_MP_" and sum(pointer) & 0xFF == 0
    assert struct.unpack_from("<I", pointer, 4)[0] == layout.MPTABLE_START + 16
    assert table[:4] == b"PCMP" and sum(table) & 0xFF == 0
    length, entries = struct.unpack_from("<H", table, 4)[0], struct.unpack_from("<H", table, 34)[0]
    assert length == len(table)
    processors = [table[44 + 20 * i + 1] for i in range(n_cpus)]
    assert processors == list(range(n_cpus))
    assert entries == n_cpus + 1 + 1 + 15 + 2


def _supported() -> list[CpuidEntry]:
    return [
        CpuidEntry(0, 0, 0, 0x1F, 0, 0, 0),
        CpuidEntry(1, 0, 0, 0x906A3, 0x00010800, 0x7FFAFBFF, 0xBFEBFBFF),
        CpuidEntry(0xB, 0, 1, 1, 2, 0x100, 3),
        CpuidEntry(0xB, 1, 1, 4, 8, 0x201, 3),
        CpuidEntry(0x8000_0008, 0, 0, 0x3030, 0, 0x7007, 0),
    ]


@pytest.mark.parametrize("n_vcpus", [1, 2, 3, 4])
def test_cpuid_topology(n_vcpus: int) -> None:
    for vcpu in range(n_vcpus):
        by_key = {
            (e.function, e.index): e for e in build_guest_cpuid(_supported(), vcpu_id=vcpu, n_vcpus=n_vcpus)
        }
        leaf1 = by_key[(1, 0)]
        assert leaf1.ebx >> 24 == vcpu
        assert (leaf1.ebx >> 16) & 0xFF == n_vcpus
        assert leaf1.ecx & (1 << 31)  # hypervisor
        assert by_key[(0xB, 0)].edx == vcpu and by_key[(0xB, 1)].ebx == n_vcpus
        assert (1 << by_key[(0xB, 1)].eax) >= n_vcpus
        assert by_key[(0x8000_0008, 0)].ecx & 0xFF == n_vcpus - 1
        assert (0x4000_0000, 0) in by_key


@pytest.mark.parametrize("offered", [False, True])
def test_cpuid_tsc_deadline_only_where_kvm_emulates_it(offered: bool) -> None:
    """KVM leaves TSC-deadline out of its supported CPUID; the VMM sets it when KVM has it."""
    supported = [replace(e, ecx=e.ecx & ~(1 << 24)) if e.function == 1 else e for e in _supported()]
    for n_vcpus in (1, 2):
        guest = build_guest_cpuid(supported, vcpu_id=0, n_vcpus=n_vcpus, tsc_deadline=offered)
        leaf1 = next(e for e in guest if e.function == 1)
        assert bool(leaf1.ecx & (1 << 24)) is offered
        assert leaf1.ecx & ~(1 << 24) == supported[1].ecx | 1 << 31


def test_mcfg_covers_exactly_the_buses_kvmpy_has() -> None:
    """An MCFG reaching past bus 0 makes Linux probe every further bus through 0xCF8/0xCFC."""
    mcfg = tables(1)[b"MCFG"]
    assert sum(mcfg) & 0xFF == 0 and struct.unpack_from("<I", mcfg, 4)[0] == len(mcfg) == 60
    base, segment, first_bus, last_bus = struct.unpack_from("<QHBB", mcfg, 44)
    assert (base, segment, first_bus, last_bus) == (layout.PCI_ECAM_START, 0, 0, layout.PCI_LAST_BUS)
    assert (last_bus - first_bus + 1) << 20 == layout.PCI_ECAM_SIZE
