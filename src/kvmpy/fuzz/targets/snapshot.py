"""The snapshot state file: the container (header, length, checksum), its msgpack sections, and
every section's decoder and checks on the way into a machine (devices, the VM, the vCPUs).

The first byte picks the mode: even, the rest is a whole state file as read from disk; odd,
the rest is the sections' payload, which the target wraps in a valid header and checksum
(a fuzzer does not get past SHA-256 on its own). The sections are restored into a stand-in
machine: the real legacy devices, and a VM and vCPUs that record what KVM would be given.
"""

from __future__ import annotations

import ctypes
import hashlib
from dataclasses import dataclass, field
from typing import Any

from kvmpy.abi import kvm as abi
from kvmpy.devices.legacy.acpi_pm import AcpiPm
from kvmpy.devices.legacy.i8042 import I8042
from kvmpy.devices.legacy.rtc import CmosRtc
from kvmpy.devices.legacy.serial import Uart16550
from kvmpy.errors import ConfigError
from kvmpy.fuzz.harness import KnownIssue, Reader, check
from kvmpy.state import machine_state, snapshot_file
from kvmpy.state.kvm_state import MAX_CPUID_ENTRIES, VcpuState, VmState
from kvmpy.state.snapshot_file import Section
from kvmpy.testing.fakes import RecordingInterruptLine

#: The MSRs the stand-in host's KVM saves and restores.
MSR_INDICES = (0x10, 0x174, 0x175, 0x176, 0x1A0, 0xC0000080, 0xC0000081, 0xC0000082, 0xC0000102)
CPUS = 2


class RecordingVm:
    """What restore_vm hands KVM, kept instead of loaded."""

    def __init__(self) -> None:
        self.loaded: list[tuple[str, object]] = []

    def set_irqchip(self, chip: object) -> None:
        self.loaded.append(("irqchip", chip))

    def set_pit2(self, pit: object) -> None:
        self.loaded.append(("pit", pit))

    def set_clock(self, clock: object) -> None:
        self.loaded.append(("clock", clock))


class RecordingVcpu:
    """What restore_vcpu hands KVM for one vCPU, checked as KVM would need it."""

    def __init__(self, index: int) -> None:
        self.id = index
        self.loaded: list[str] = []

    def __getattr__(self, name: str) -> object:
        if not name.startswith("set_"):
            raise AttributeError(name)

        def record(value: object) -> None:
            if name == "set_cpuid":
                check(len(value) <= MAX_CPUID_ENTRIES, f"{len(value)} CPUID entries reach KVM")  # type: ignore[arg-type]
            if name == "set_msrs":
                check(all(index in MSR_INDICES for index, _ in value), "an unknown MSR reaches KVM")  # type: ignore[attr-defined]
            self.loaded.append(name)

        return record


class RecordingSystem:
    def msr_index_list(self) -> list[int]:
        return list(MSR_INDICES)


def _acpi_pm() -> AcpiPm:
    def nothing() -> None:
        pass

    return AcpiPm(nothing, nothing, RecordingInterruptLine(), clock=lambda: 0.0)


class StandInPci:
    """A machine's PCI platform with no virtio device (this target fuzzes the rest)."""

    def __init__(self) -> None:
        self.by_id: dict[str, object] = {}

    def place_restored_bars(self) -> None:
        pass


@dataclass
class StandInMachine:
    """The attributes restore_machine reads: the legacy devices, the VM, the vCPUs, the system."""

    serial: Uart16550 = field(default_factory=lambda: Uart16550(RecordingInterruptLine(), lambda _d: None))
    i8042: I8042 = field(default_factory=lambda: I8042(lambda: None, RecordingInterruptLine()))
    rtc: CmosRtc = field(default_factory=lambda: CmosRtc(clock=lambda: 1_780_000_000.0))
    acpi_pm: AcpiPm = field(default_factory=lambda: _acpi_pm())
    vm: RecordingVm = field(default_factory=RecordingVm)
    vcpus: list[RecordingVcpu] = field(default_factory=lambda: [RecordingVcpu(i) for i in range(CPUS)])
    system: RecordingSystem = field(default_factory=RecordingSystem)
    pci: StandInPci = field(default_factory=StandInPci)


def _use(machine: StandInMachine) -> None:
    """What a guest does first after a restore: read the clock, the UART, the i8042, the PM timer."""
    byte, word = memoryview(bytearray(1)), memoryview(bytearray(4))
    for register in (0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32):
        machine.rtc.write(0, bytes([register]))
        machine.rtc.read(1, byte)
    machine.serial.read(5, byte)
    machine.i8042.read(4, byte)
    machine.acpi_pm.read(8, word)


def wrap(payload: bytes) -> bytes:
    """``payload`` as a state file with a valid header and checksum."""
    header = snapshot_file._HEADER.pack(snapshot_file.MAGIC, snapshot_file.ARCH, snapshot_file.FORMAT_VERSION,
                                        0, len(payload))  # fmt: skip
    body = header + payload
    return body + hashlib.sha256(body).digest()


class SnapshotTarget:
    name = "snapshot"
    max_len = 32768
    invariants = (
        "only StateError (a ConfigError) escapes: from parse_state, the section decoders, "
        "read_description and restore_machine",
        "a description that is accepted gives a configuration a machine can be built from",
        "every device restored from a snapshot answers the guest (the RTC's time, the UART's "
        "line status, the i8042's status, the PM timer) and saves a state that restores to itself",
        "what reaches KVM has been checked: at most 256 CPUID entries, only MSRs the host lists",
    )
    #: None open (``python -m kvmpy.fuzz list --invariants`` reads it of every target).
    known: tuple[KnownIssue, ...] = ()

    def run(self, data: bytes) -> None:
        reader = Reader(data)
        mode = reader.u8()
        rest = reader.rest()
        file = wrap(rest) if mode & 1 else rest
        try:
            sections = snapshot_file.parse_state(file, "fuzz.state")
        except ConfigError:
            return
        check(sum(len(s.data) for s in sections.values()) <= len(file), "sections larger than the file")
        try:
            described = machine_state.read_description(sections)
            machine_state.config_for_restore(described)
        except ConfigError:
            pass
        machine = StandInMachine()
        try:
            machine_state.restore_machine(machine, sections)  # type: ignore[arg-type]
        except ConfigError:
            return
        _use(machine)
        devices: tuple[Any, ...] = (machine.serial, machine.i8042, machine.rtc, machine.acpi_pm)
        for device in devices:
            saved = device.save()
            device.restore(saved)
            check(device.save() == saved, f"{type(device).__name__}: a restored state changes on restore")

    def seeds(self) -> list[bytes]:
        machine = StandInMachine()
        described = machine_state.MachineDescription(
            CPUS, 256 << 20, (machine_state.RegionState(0, 256 << 20, 0),), "serial", "console=ttyS0"
        )
        sections = {"machine": Section(machine_state.MACHINE_VERSION, snapshot_file.encode(described))}
        for name, device in (("serial", machine.serial), ("i8042", machine.i8042), ("rtc", machine.rtc),
                             ("acpi-pm", machine.acpi_pm)):  # fmt: skip
            sections[f"device:{name}"] = Section(
                machine_state.DEVICE_VERSION, snapshot_file.encode(device.save())
            )

        def chip(chip_id: int) -> bytes:
            value = abi.kvm_irqchip()
            value.chip_id = chip_id
            return bytes(value)

        vm = VmState(chip(abi.KVM_IRQCHIP_PIC_MASTER), chip(abi.KVM_IRQCHIP_PIC_SLAVE),
                     chip(abi.KVM_IRQCHIP_IOAPIC), bytes(ctypes.sizeof(abi.kvm_pit_state2)),
                     bytes(ctypes.sizeof(abi.kvm_clock_data)))  # fmt: skip
        sections["vm"] = Section(machine_state.KVM_VERSION, snapshot_file.encode(vm))

        def vcpu(index: int) -> VcpuState:
            def zeros(ctype: type) -> bytes:
                return bytes(ctypes.sizeof(ctype))

            return VcpuState(index, 2_000_000, zeros(abi.kvm_cpuid_entry2) * 2, zeros(abi.kvm_regs),
                             zeros(abi.kvm_sregs), zeros(abi.kvm_xsave), zeros(abi.kvm_xcrs),
                             ((0x10, 12345), (0xC0000080, 0x500)), zeros(abi.kvm_lapic_state), 0,
                             zeros(abi.kvm_vcpu_events), zeros(abi.kvm_debugregs))  # fmt: skip

        sections["vcpus"] = Section(
            machine_state.KVM_VERSION, snapshot_file.encode(tuple(vcpu(i) for i in range(CPUS)))
        )
        payload = snapshot_file.msgspec.msgpack.encode(sections)
        without_vcpus = snapshot_file.msgspec.msgpack.encode(
            {k: v for k, v in sections.items() if k != "vcpus"}
        )
        return [b"\1" + payload, b"\0" + wrap(payload), b"\1" + without_vcpus]


FACTORIES = {"snapshot": SnapshotTarget}

__all__ = ["FACTORIES", "SnapshotTarget", "wrap"]
