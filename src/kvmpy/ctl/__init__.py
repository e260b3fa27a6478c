"""``kvmpy ctl SOCKET COMMAND``: a client for people of a running kvmpy's API.

It speaks HTTP/1.1 over the API's Unix socket with the standard library
(http.client on an AF_UNIX socket, :mod:`kvmpy.ctl.client`) and nothing more:
Firecracker's routes for the lifecycle (``GET /``, ``PATCH /vm``) and kvmpy's
monitor routes under ``/kvmpy/``. Every command prints a table for people
(:mod:`kvmpy.ctl.formatting`), or with ``--json`` the API's answer as it came.
A failure (no socket, nobody listening, a refused request) is one line on
stderr and a non-zero exit status.

This module only declares the command line: every kvmpy command builds the
parser, so the client and the formatters are imported when a ctl command runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvmpy.errors import ConfigError

if TYPE_CHECKING:
    from kvmpy.ctl.client import ApiClient

#: How long one request may take: monitor queries wait for a vCPU's next exit at most.
TIMEOUT = 10.0


# --- numbers ----------------------------------------------------------------------------
def parse_address(text: str) -> int:
    """An address as people type one: hex with or without 0x, underscores allowed."""
    cleaned = text.strip().lower().replace("_", "")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal address") from None
    if not 0 <= value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a 64-bit address")
    return value


def parse_length(text: str) -> int:
    """A byte count: decimal, or hex with 0x."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a length") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("the length must be positive")
    return value


# --- the commands -----------------------------------------------------------------------
def _formatter(name: str) -> Callable[[Any], str]:
    from kvmpy.ctl import formatting

    function: Callable[[Any], str] = getattr(formatting, name)
    return function


def _print(args: argparse.Namespace, answer: Any, formatter: str | Callable[[Any], str]) -> int:
    import json

    show = _formatter(formatter) if isinstance(formatter, str) else formatter
    print(json.dumps(answer, indent=2) if args.json else show(answer))
    return 0


def _client(args: argparse.Namespace) -> ApiClient:
    from kvmpy.ctl.client import ApiClient

    return ApiClient(args.socket, timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    return _print(args, _client(args).request("GET", "/"), "format_status")


def _set_state(state: str) -> Callable[[argparse.Namespace], int]:
    def change(args: argparse.Namespace) -> int:
        client = _client(args)
        client.request("PATCH", "/vm", {"state": state})
        return _print(args, client.request("GET", "/"), "format_status")

    return change


def _quit(args: argparse.Namespace) -> int:
    _client(args).request("PUT", "/kvmpy/stop", {"reason": "stopped by kvmpy ctl"})
    if not args.json:
        print("stop requested")
    return 0


def _stats(args: argparse.Namespace) -> int:
    import json

    from kvmpy.ctl.formatting import format_rates

    client = _client(args)
    if not args.watch:
        return _print(args, client.get("/kvmpy/stats"), lambda answer: str(answer["table"]))
    if args.interval <= 0:
        raise ConfigError("--interval must be positive")
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() and not args.json else ""
    before = client.get("/kvmpy/stats")
    shown = 0
    try:
        while args.count is None or shown < args.count:
            time.sleep(args.interval)
            after = client.get("/kvmpy/stats")
            if args.json:
                print(json.dumps({"before": before, "after": after}), flush=True)
            else:
                print(clear + format_rates(before, after), flush=True)
                if not clear:
                    print()
            before = after
            shown += 1
    except KeyboardInterrupt:
        pass
    return 0


def _regs(args: argparse.Namespace) -> int:
    return _print(args, _client(args).get("/kvmpy/regs", vcpu=args.vcpu), "format_registers")


def _translate(args: argparse.Namespace) -> int:
    answer = _client(args).get("/kvmpy/translate", gva=f"{args.gva:#x}", vcpu=args.vcpu)
    return _print(args, answer, "format_translate")


def _examine(args: argparse.Namespace) -> int:
    answer = _client(args).get(
        "/kvmpy/memory",
        address=f"{args.address:#x}",
        length=args.length,
        space="gpa" if args.physical else "gva",
        vcpu=args.vcpu,
    )
    return _print(args, answer, "format_memory")


def _query(path: str, formatter: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        return _print(args, _client(args).get(path), formatter)

    return run


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    ctl = subparsers.add_parser(
        "ctl",
        help="inspect and drive a running kvmpy through its API socket",
        description="A client of a running kvmpy's API (kvmpy run --api-sock SOCKET).",
    )
    ctl.add_argument("socket", metavar="SOCKET", help="the API socket (kvmpy run --api-sock)")
    ctl.add_argument("--json", action="store_true", help="print the API's answer as JSON")
    ctl.add_argument("--timeout", type=float, default=TIMEOUT, help="seconds to wait for each answer")
    commands = ctl.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], text: str
    ) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=text, description=text)
        parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.set_defaults(handler=handler)
        return parser

    command("status", _status, "the instance: id, state, version (GET /)")
    command("pause", _set_state("Paused"), "pause the VM: every vCPU parked outside the guest")
    command("resume", _set_state("Resumed"), "resume a paused VM where it stopped")
    command("quit", _quit, "stop the VM and the VMM")
    stats = command("stats", _stats, "exits by reason and by device, for the whole run so far")
    stats.add_argument("--watch", action="store_true", help="refresh exit rates over each interval")
    stats.add_argument("--interval", type=float, default=1.0, help="seconds between samples (default 1)")
    stats.add_argument("--count", type=int, default=None, help="stop after this many refreshes")
    regs = command("regs", _regs, "a vCPU's registers, flags decoded, CPL and paging mode")
    regs.add_argument("vcpu", nargs="?", type=int, default=0, metavar="VCPU")
    translate = command("translate", _translate, "GVA -> GPA -> HVA -> HPA through the guest's page tables")
    translate.add_argument("gva", type=parse_address, metavar="GVA")
    translate.add_argument("--vcpu", type=int, default=0)
    examine = command("x", _examine, "a hex and ASCII dump of guest memory (GVA, or GPA with --physical)")
    examine.add_argument("address", type=parse_address, metavar="ADDRESS")
    examine.add_argument("length", type=parse_length, metavar="LENGTH")
    examine.add_argument("--physical", action="store_true", help="ADDRESS is guest-physical")
    examine.add_argument("--vcpu", type=int, default=0, help="whose page tables translate a GVA")
    command(
        "mtree", _query("/kvmpy/mtree", "format_memory_tree"), "memory slots, MMIO and port ranges, PCI BARs"
    )
    command("irq", _query("/kvmpy/irq", "format_irq"), "PICs, IOAPIC redirections, MSI routes, local APICs")
    command("vcpus", _query("/kvmpy/vcpus", "format_vcpus"), "each vCPU's state, exits and time in the guest")
    from kvmpy.ctl import state_commands

    state_commands.register(command)


__all__ = ["TIMEOUT", "parse_address", "parse_length", "register"]
