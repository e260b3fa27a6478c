"""What a snapshot of a Machine holds, and how it is taken and put back.

A snapshot is the state file (see :mod:`snapshot_file`) and the memory file
(guest RAM regions back to back). The state file's sections:

- ``machine``: what to build before restoring (vCPUs, RAM regions and their
  offsets in the memory file, the devices and their host resources: disk
  paths and options, taps and MACs, device ids and their PCI slots);
- ``device:<name>``: each device's own state, saved before KVM's (finishing a
  device's work may raise an interrupt that must land in the saved irqchip);
  a virtio device's section holds its PCI transport (configuration space,
  MSI-X, virtio-pci registers, every virtqueue) and its model's state;
- ``vm``: the in-kernel PICs, IOAPIC, PIT and kvmclock;
- ``vcpus``: every vCPU's state.

Save happens only while the machine is paused, with the device event loop
quiesced and the coalesced ring drained. Restore builds a machine from the
``machine`` section with RAM mapped privately from the memory file, then
loads devices, the VM and the vCPUs, all validated as untrusted input; the
wiring (BARs and their ioeventfds, MSI routes, INTx levels) is rebuilt from
the restored state, and the virtio devices start again last.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from kvmpy.arch.x86 import layout
from kvmpy.devices.legacy.acpi_pm import AcpiPmState
from kvmpy.devices.legacy.i8042 import I8042State
from kvmpy.devices.legacy.rtc import CmosRtcState
from kvmpy.devices.legacy.serial import Uart16550State
from kvmpy.memory.guest_memory import PAGE_SIZE
from kvmpy.state.errors import StateError
from kvmpy.state.kvm_state import VcpuState, VmState, restore_vcpu, restore_vm, save_vcpu, save_vm
from kvmpy.state.snapshot_file import Section, decode, encode, section
from kvmpy.virtio.pci_transport import TransportState
from kvmpy.vmm.config import (
    MAX_VCPUS,
    MIN_MEMORY,
    BalloonConfig,
    DiskConfig,
    NetConfig,
    RateLimiterConfig,
    SerialConfig,
    SerialMode,
    VmConfig,
)

if TYPE_CHECKING:
    from kvmpy.vmm.machine import Machine

#: 2: the virtio devices and their PCI slots (a version-1 file has none and still loads).
MACHINE_VERSION = 2
DEVICE_VERSION = 1
VIRTIO_VERSION = 1
KVM_VERSION = 1
PCI_SLOTS = 32


@dataclass(frozen=True, slots=True)
class RegionState:
    gpa: int
    size: int
    #: Where the region starts in the memory file.
    offset: int


@dataclass(frozen=True, slots=True)
class DiskDescription:
    """A disk as configured: the image is not in the snapshot, the restore opens this path."""

    path: str
    read_only: bool
    id: str
    direct: bool
    cache_type: str
    rate_limiter: RateLimiterConfig | None


@dataclass(frozen=True, slots=True)
class PciSlot:
    device: str
    slot: int


@dataclass(frozen=True, slots=True)
class MachineDescription:
    """Enough to build the same machine again (the kernel is not needed: RAM holds it)."""

    cpus: int
    memory: int
    regions: tuple[RegionState, ...]
    console: str
    cmdline: str
    disks: tuple[DiskDescription, ...] = ()
    #: Each interface with the MAC the guest saw (derived ones included).
    nets: tuple[NetConfig, ...] = ()
    rng: bool = False
    rng_rate_limiter: RateLimiterConfig | None = None
    #: Every virtio device's id and slot.
    pci_slots: tuple[PciSlot, ...] = ()
    balloon: BalloonConfig | None = None


@dataclass(frozen=True, slots=True)
class VirtioDeviceState:
    """A ``device:<id>`` section of a virtio device: its transport, and its model's own
    state encoded as that model's state type (decoded once the device is known)."""

    transport: TransportState
    model: bytes


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
    disks = tuple(
        DiskDescription(os.path.abspath(d.path), d.read_only, d.id, d.direct, d.cache_type, d.rate_limiter)
        for d in config.disks  # absolute: a restore may run in another directory
    )
    nets = tuple(_with_mac(machine, number, net) for number, net in enumerate(config.nets))
    slots = tuple(PciSlot(name, slot) for name, slot in sorted(machine.pci.slots().items()))
    return MachineDescription(
        config.cpus, config.memory, tuple(regions), config.console, config.cmdline,
        disks, nets, config.rng, config.rng_rate_limiter, slots, config.balloon,
    )  # fmt: skip


def _with_mac(machine: Machine, number: int, net: NetConfig) -> NetConfig:
    from kvmpy.vmm.machine import net_device_id

    device: Any = machine.pci.by_id[net_device_id(number, net.id)].device
    mac = ":".join(f"{byte:02x}" for byte in device.mac)
    # The queue pairs the device has, not "one per vCPU": the restore must build the same queues.
    limits = (net.rx_rate_limiter, net.tx_rate_limiter)
    return NetConfig(net.tap, mac, net.id, *limits, vhost=net.vhost, queues=device.queue_pairs)


def check_quiet(machine: Machine) -> None:
    """A snapshot is taken only with nothing in flight: the vCPUs parked, the device event
    loop waiting (no handler mid-request), and every buffered write applied."""
    if not machine.paused:
        raise StateError("a snapshot is taken only from a paused VM")
    if machine.pci.assigned:
        named = ", ".join(function.device.bdf for function in machine.pci.assigned.values())
        raise StateError(
            f"a VM with an assigned device ({named}) cannot be snapshotted or migrated: the device's"
            " state is in the hardware, and its DMA writes are in no dirty log"
        )
    if machine.events.is_alive() and not machine.events.paused:
        raise StateError("the device event loop is still running a request; pause the VM first")
    if machine.coalesced is not None and machine.coalesced.pending():
        raise StateError("KVM's coalesced ring still holds writes the devices have not seen")


def save_machine(machine: Machine) -> dict[str, Section]:
    """Every section of a paused machine's state file: devices first, then KVM's state."""
    check_quiet(machine)
    sections = {"machine": Section(MACHINE_VERSION, encode(describe_machine(machine)))}
    for name, (device, _) in _legacy_devices(machine).items():
        sections[f"device:{name}"] = Section(DEVICE_VERSION, encode(device.save()))
    for name, transport in machine.pci.by_id.items():
        if f"device:{name}" in sections:
            raise StateError(
                f"two devices would save as device:{name}: give the disk or interface another id"
            )
        with transport.device.guard.lock:  # the model and its rings saved as one
            model = encode(transport.device.save())
            state = VirtioDeviceState(transport.save(), model)
        sections[f"device:{name}"] = Section(VIRTIO_VERSION, encode(state))
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
    described = section(sections, "machine", MachineDescription, (1, MACHINE_VERSION))
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
    _check_devices(described)
    return described


def _check_devices(described: MachineDescription) -> None:
    """The devices a restore will build: paths given, ids distinct, slots in range and free."""
    from kvmpy.virtio.devices.blk import CACHE_TYPES
    from kvmpy.vmm.machine import disk_device_id, net_device_id

    for disk in described.disks:
        if not disk.path or "\0" in disk.path:
            raise StateError("the snapshot has a disk without a usable path")
        if disk.cache_type not in CACHE_TYPES:
            raise StateError(f"the snapshot's disk {disk.path} has cache type {disk.cache_type!r}")
    from kvmpy.virtio.devices.tap import MAX_QUEUE_PAIRS

    for net in described.nets:
        if not 0 <= net.queues <= MAX_QUEUE_PAIRS or net.vhost not in ("auto", "on", "off"):
            what = f"{net.queues} queue pairs, vhost={net.vhost}"
            raise StateError(f"the snapshot's interface on {net.tap} has {what}")
    ids = [disk_device_id(n, d.id) for n, d in enumerate(described.disks)]
    ids += [net_device_id(n, net.id) for n, net in enumerate(described.nets)]
    ids += ["virtio-rng"] * described.rng + ["virtio-console"] * (described.console == "virtio")
    ids += ["virtio-balloon"] * (described.balloon is not None)
    slots = {placed.device: placed.slot for placed in described.pci_slots}
    if len(set(ids)) != len(ids) or sorted(slots) != sorted(ids) or len(slots) != len(described.pci_slots):
        raise StateError("the snapshot's PCI slots do not name its virtio devices once each")
    taken = sorted(slots.values())
    if any(not 1 <= slot < PCI_SLOTS for slot in taken) or len(set(taken)) != len(taken):
        raise StateError(f"the snapshot's PCI slots {taken} are not distinct slots 1 to {PCI_SLOTS - 1}")


def check_memory_file(path: Path, described: MachineDescription) -> None:
    needed = sum(region.size for region in described.regions)
    try:
        size = path.stat().st_size
    except OSError as error:
        raise StateError(f"cannot read the memory file {path}: {error.strerror}") from None
    if size < needed:
        raise StateError(f"the memory file {path} has {size} bytes; the snapshot's RAM needs {needed}")


def config_for_restore(
    described: MachineDescription,
    serial: SerialConfig | None = None,
    track_dirty_pages: bool = False,
    network_overrides: tuple[tuple[str, str], ...] = (),
) -> VmConfig:
    """The configuration a restored machine is built from: the same devices on the same
    host resources, but for interfaces ``network_overrides`` (iface id, tap) moves."""
    taps = dict(network_overrides)
    unknown = sorted(set(taps) - {net.id for net in described.nets if net.id})
    if unknown:
        raise StateError(f"network_overrides names {', '.join(unknown)}: the snapshot has no such interface")
    nets = tuple(
        msgspec.structs.replace(net, tap=taps.get(net.id, net.tap) if net.id else net.tap)
        for net in described.nets
    )  # fmt: skip
    disks = tuple(
        DiskConfig(
            Path(d.path), d.read_only, d.id, d.direct, cache_type=d.cache_type, rate_limiter=d.rate_limiter
        )
        for d in described.disks
    )
    return VmConfig(
        track_dirty_pages=track_dirty_pages,
        cpus=described.cpus,
        memory=described.memory,
        console=described.console,
        cmdline=described.cmdline,
        serial=serial or SerialConfig(SerialMode.STDIO),
        disks=disks,
        nets=nets,
        rng=described.rng,
        rng_rate_limiter=described.rng_rate_limiter,
        balloon=described.balloon,
        pci_slots=tuple((placed.device, placed.slot) for placed in described.pci_slots),
    )


def restore_machine(machine: Machine, sections: dict[str, Section], clock_realtime: bool = False) -> None:
    """Load every saved device, the VM and each vCPU into a freshly built ``machine``."""
    for name, (device, kind) in _legacy_devices(machine).items():
        state: Any = section(sections, f"device:{name}", kind, (DEVICE_VERSION,))
        _restore_device(name, device.restore, state)
    _restore_virtio(machine, sections)
    restore_vm(machine.vm, section(sections, "vm", VmState, (KVM_VERSION,)), clock_realtime)
    vcpus = section(sections, "vcpus", tuple[VcpuState, ...], (KVM_VERSION,))
    if len(vcpus) != len(machine.vcpus) or [v.id for v in vcpus] != [v.id for v in machine.vcpus]:
        raise StateError(f"the snapshot has {len(vcpus)} vCPU states for {len(machine.vcpus)} vCPUs")
    msr_indices = machine.system.msr_index_list()
    for vcpu, state in zip(machine.vcpus, vcpus, strict=True):
        restore_vcpu(vcpu, state, msr_indices)
    for transport in machine.pci.by_id.values():  # last: interrupts land in the restored irqchip
        transport.start_after_restore()


def _restore_virtio(machine: Machine, sections: dict[str, Section]) -> None:
    """Every virtio device from its own section, keyed by device id; then the BARs placed
    (and their ioeventfds bound) where the restored configuration spaces say."""
    known = {f"device:{name}" for name in (*_legacy_devices(machine), *machine.pci.by_id)}
    extra = sorted(name for name in sections if name.startswith("device:") and name not in known)
    if extra:
        raise StateError(f"the snapshot has state for {', '.join(extra)}, which this machine does not have")
    for name, transport in machine.pci.by_id.items():
        state = section(sections, f"device:{name}", VirtioDeviceState, (VIRTIO_VERSION,))
        model: Any = decode(f"device:{name}", state.model, transport.device.state_type)
        _restore_device(name, transport.restore, state.transport)
        _restore_device(name, transport.device.restore, model)
    machine.pci.place_restored_bars()


def _restore_device(name: str, load: Callable[[Any], None], state: Any) -> None:
    try:
        load(state)
    except (ValueError, TypeError) as error:  # the devices' own range checks
        raise StateError(f"snapshot section device:{name}: {error}") from None


__all__ = [
    "DiskDescription",
    "MachineDescription",
    "PciSlot",
    "VirtioDeviceState",
    "check_quiet",
    "RegionState",
    "check_memory_file",
    "config_for_restore",
    "merge_memory_file",
    "read_description",
    "restore_machine",
    "save_machine",
    "write_memory_file",
]
