"""``kvmpy snapshot inspect FILE``: what a snapshot's state file holds, section by section.

Every kvmpy command builds this parser: the snapshot modules load only when a
snapshot command runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path


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
    print(f"{'section':<20} {'version':>7} {'bytes':>9}")
    for name, version, size in describe(sections):
        print(f"{name:<20} {version:>7} {size:>9}")
    return 0


__all__ = ["register"]
