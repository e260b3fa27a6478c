"""What a snapshot of a Machine holds, and how it is taken and put back.

A snapshot is the state file (see :mod:`snapshot_file`) and the memory file
(guest RAM regions back to back). The state file's sections:

- ``machine``: what to build before restoring (vCPUs, RAM regions and their
  offsets in the memory file, the devices and their host resources);
- ``device:<name>``: each device's own state, saved before KVM's (finishing a
  device's work may raise an interrupt that must land in the saved irqchip);
- ``vm``: the in-kernel PICs, IOAPIC, PIT and kvmclock;
- ``vcpus``: every vCPU's state.

Save happens only while the machine is paused. Restore builds a machine from
the ``machine`` section with RAM mapped privately from the memory file, then
loads devices, the VM and the vCPUs, all validated as untrusted input.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmpy.arch.x86 import layout
from kvmpy.devices.legacy.acpi_pm import AcpiPmState
from kvmpy.devices.legacy.i8042 import I8042State
from kvmpy.devices.legacy.rtc import CmosRtcState
from kvmpy.devices.legacy.serial import Uart16550State
from kvmpy.memory.guest_memory import PAGE_SIZE
from kvmpy.state.errors import StateError
from kvmpy.state.kvm_state import VcpuState, VmState, restore_vcpu, restore_vm, save_vcpu, save_vm
from kvmpy.state.snapshot_file import Section, encode, section
from kvmpy.vmm.config import MAX_VCPUS, MIN_MEMORY, SerialConfig, SerialMode, VmConfig

if TYPE_CHECKING:
    from kvmpy.vmm.machine import Machine

MACHINE_VERSION = 1
DEVICE_VERSION = 1
KVM_VERSION = 1


@dataclass(frozen=True, slots=True)
class RegionState:
    gpa: int
    size: int
    #: Where the region starts in the memory file.
    offset: int


@dataclass(frozen=True, slots=True)
class MachineDescription:
    """Enough to build the same machine again (the kernel is not needed: RAM holds it)."""

    cpus: int
    memory: int
    regions: tuple[RegionState, ...]
    console: str
    cmdline: str


def _legacy_devices(machine: Machine) -> dict[str, tuple[Any, type]]:
    """The devices whose state a snapshot carries: name -> (device, its state type)."""
    return {
        "serial": (machine.serial, Uart16550State),
        "i8042": (machine.i8042, I8042State),
        "rtc": (machine.rtc, CmosRtcState),
        "acpi-pm": (machine.acpi_pm, AcpiPmState),
    }


def describe_machine(machine: Machine) -> MachineDescription:
    offset, regions = 0, []
    for region in machine.memory:
        regions.append(RegionState(region.gpa, region.size, offset))
        offset += region.size
    config = machine.config
    return MachineDescription(config.cpus, config.memory, tuple(regions), config.console, config.cmdline)


def save_machine(machine: Machine) -> dict[str, Section]:
    """Every section of a paused machine's state file."""
    if not machine.paused:
        raise StateError("a snapshot is taken only from a paused VM")
    if machine.pci.transports:
        count = len(machine.pci.transports)
        raise StateError(f"kvmpy cannot yet snapshot a VM with virtio devices (this one has {count})")
    sections = {"machine": Section(MACHINE_VERSION, encode(describe_machine(machine)))}
    for name, (device, _) in _legacy_devices(machine).items():
        sections[f"device:{name}"] = Section(DEVICE_VERSION, encode(device.save()))
    sections["vm"] = Section(KVM_VERSION, encode(save_vm(machine.vm)))
    msr_indices = machine.system.msr_index_list()
    vcpus = tuple(save_vcpu(vcpu, msr_indices) for vcpu in machine.vcpus)
    sections["vcpus"] = Section(KVM_VERSION, encode(vcpus))
    return sections


def write_memory_file(machine: Machine, path: Path, pages: list[list[int]] | None = None) -> int:
    """Guest RAM into ``path`` (regions back to back, as the machine section describes).

    With ``pages`` (per region, as ``Machine.take_dirty_pages`` gives them) only
    those pages are written, at their places in an otherwise empty sparse file:
    a diff snapshot, to be merged onto its base (``kvmpy snapshot merge``).
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise StateError(f"cannot write the memory file {path}: {error.strerror}") from None
    try:
        if pages is None:
            written = machine.memory.write_to(fd)
        else:
            written = _write_pages(machine, fd, pages)
        os.fsync(fd)
    except OSError as error:
        raise StateError(f"cannot write the memory file {path}: {error.strerror}") from None
    finally:
        os.close(fd)
    return written


def _write_pages(machine: Machine, fd: int, pages: list[list[int]]) -> int:
    offset, written = 0, 0
    for region, numbers in zip(machine.memory, pages, strict=True):
        for number in numbers:
            start = number * PAGE_SIZE
            written += os.pwrite(fd, region.view[start : start + PAGE_SIZE], offset + start)
        offset += region.size
    os.ftruncate(fd, offset)
    return written


def merge_memory_file(diff: Path, base: Path) -> int:
    """Copy the pages a diff memory file holds onto its base; returns the bytes copied.

    A diff file is sparse: its data extents (SEEK_DATA/SEEK_HOLE) are exactly
    the pages it holds, written even where they are zeros.
    """
    copied = 0
    try:
        with diff.open("rb") as source, base.open("r+b") as target:
            size = os.fstat(source.fileno()).st_size
            if os.fstat(target.fileno()).st_size != size:
                raise StateError(f"{diff} and {base} are memory files of different sizes")
            position = 0
            while position < size:
                try:
                    start = os.lseek(source.fileno(), position, os.SEEK_DATA)
                except OSError:  # ENXIO: no data past here
                    break
                end = os.lseek(source.fileno(), start, os.SEEK_HOLE)
                copied += _copy_range(source.fileno(), target.fileno(), start, end)
                position = end
            os.fsync(target.fileno())
    except OSError as error:
        raise StateError(f"cannot merge {diff} onto {base}: {error.strerror}") from None
    return copied


def _copy_range(source: int, target: int, start: int, end: int) -> int:
    copied = 0
    while start < end:
        chunk = os.pread(source, min(end - start, 1 << 20), start)
        os.pwrite(target, chunk, start)
        start += len(chunk)
        copied += len(chunk)
    return copied


def read_description(sections: dict[str, Section]) -> MachineDescription:
    """The ``machine`` section, checked against what this kvmpy can build."""
    described = section(sections, "machine", MachineDescription, (MACHINE_VERSION,))
    if not 1 <= described.cpus <= MAX_VCPUS:
        raise StateError(f"the snapshot has {described.cpus} vCPUs; kvmpy runs 1 to {MAX_VCPUS}")
    if described.memory < MIN_MEMORY:
        raise StateError(f"the snapshot's RAM ({described.memory} bytes) is below {MIN_MEMORY >> 20} MiB")
    expected = layout.ram_ranges(described.memory)
    if [(r.gpa, r.size) for r in described.regions] != list(expected):
        raise StateError("the snapshot's RAM regions are not the ones its memory size gives")
    offset = 0
    for region in described.regions:
        if region.offset != offset:
            raise StateError(f"the snapshot's region at {region.gpa:#x} is not where the memory file has it")
        offset += region.size
    if described.console not in ("serial", "virtio"):
        raise StateError(f"the snapshot's console {described.console!r} is not serial or virtio")
    return described


def check_memory_file(path: Path, described: MachineDescription) -> None:
    needed = sum(region.size for region in described.regions)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise StateError(f"cannot read the memory file {path}: {error.strerror}") from None
    if size < needed:
        raise StateError(f"the memory file {path} has {size} bytes; the snapshot's RAM needs {needed}")


def config_for_restore(
    described: MachineDescription, serial: SerialConfig | None = None, track_dirty_pages: bool = False
) -> VmConfig:
    """The configuration a restored machine is built from."""
    return VmConfig(
        track_dirty_pages=track_dirty_pages,
        cpus=described.cpus,
        memory=described.memory,
        console=described.console,
        cmdline=described.cmdline,
        serial=serial or SerialConfig(SerialMode.STDIO),
    )


def restore_machine(machine: Machine, sections: dict[str, Section]) -> None:
    """Load every saved device, the VM and each vCPU into a freshly built ``machine``."""
    for name, (device, kind) in _legacy_devices(machine).items():
        state: Any = section(sections, f"device:{name}", kind, (DEVICE_VERSION,))
        _restore_device(name, device.restore, state)
    restore_vm(machine.vm, section(sections, "vm", VmState, (KVM_VERSION,)))
    vcpus = section(sections, "vcpus", tuple[VcpuState, ...], (KVM_VERSION,))
    if len(vcpus) != len(machine.vcpus) or [v.id for v in vcpus] != [v.id for v in machine.vcpus]:
        raise StateError(f"the snapshot has {len(vcpus)} vCPU states for {len(machine.vcpus)} vCPUs")
    msr_indices = machine.system.msr_index_list()
    for vcpu, state in zip(machine.vcpus, vcpus, strict=True):
        restore_vcpu(vcpu, state, msr_indices)


def _restore_device(name: str, load: Callable[[Any], None], state: Any) -> None:
    try:
        load(state)
    except (ValueError, TypeError) as error:  # the devices' own range checks
        raise StateError(f"snapshot section device:{name}: {error}") from None


__all__ = [
    "MachineDescription",
    "RegionState",
    "check_memory_file",
    "config_for_restore",
    "merge_memory_file",
    "read_description",
    "restore_machine",
    "save_machine",
    "write_memory_file",
]
