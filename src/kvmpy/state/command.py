"""``kvmpy snapshot inspect FILE``: what a snapshot's state file holds, section by section.

Every kvmpy command builds this parser: the snapshot modules load only when a
snapshot command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvmpy.state.machine_state import MachineDescription


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    snapshot = subparsers.add_parser("snapshot", help="look at snapshots")
    commands = snapshot.add_subparsers(dest="snapshot_command", required=True)
    inspect = commands.add_parser("inspect", help="print the sections of a snapshot's state file")
    inspect.add_argument("file", type=Path)
    inspect.set_defaults(handler=_inspect)
    merge = commands.add_parser("merge", help="copy a diff snapshot's memory file onto its base's")
    merge.add_argument("diff", type=Path, help="the diff snapshot's memory file")
    merge.add_argument("base", type=Path, help="the base memory file (changed in place)")
    merge.set_defaults(handler=_merge)


def _merge(args: argparse.Namespace) -> int:
    from kvmpy.state.machine_state import merge_memory_file

    copied = merge_memory_file(args.diff, args.base)
    print(f"{args.base}: {copied >> 10} KiB from {args.diff}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from kvmpy.state.machine_state import read_description
    from kvmpy.state.snapshot_file import FORMAT_VERSION, describe, read_state_file

    sections = read_state_file(args.file)
    machine = read_description(sections)
    print(f"{args.file}: kvmpy snapshot, format version {FORMAT_VERSION}")
    ram = f"{machine.memory >> 20} MiB of RAM in {len(machine.regions)} regions"
    print(f"machine: {machine.cpus} vCPUs, {ram}, console {machine.console}")
    for region in machine.regions:
        end = region.gpa + region.size - 1
        print(f"  RAM {region.gpa:#014x}-{end:#014x} at memory file offset {region.offset:#x}")
    for line in _devices(machine):
        print(f"  {line}")
    width = max([20, *(len(name) + 1 for name in sections)])
    print(f"{'section':<{width}} {'version':>7} {'bytes':>9}")
    for name, version, size in describe(sections):
        print(f"{name:<{width}} {version:>7} {size:>9}")
    return 0


def _devices(machine: MachineDescription) -> list[str]:
    """The virtio devices and the host resources a restore opens again (the disk images
    and taps the user must keep)."""
    from kvmpy.vmm.machine import disk_device_id, net_device_id

    resources: dict[str, str] = {"virtio-rng": "getrandom", "virtio-console": "the console"}
    for number, disk in enumerate(machine.disks):
        mode = "read-only" if disk.read_only else "read-write"
        resources[disk_device_id(number, disk.id)] = f"disk image {disk.path} ({mode})"
    for number, net in enumerate(machine.nets):
        resources[net_device_id(number, net.id)] = f"tap {net.tap}, MAC {net.mac}"
    slots = sorted(machine.pci_slots, key=lambda placed: placed.slot)
    return [f"PCI slot {p.slot}: {p.device} on {resources.get(p.device, '?')}" for p in slots]


__all__ = ["register"]
