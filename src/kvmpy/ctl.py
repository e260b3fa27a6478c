"""``kvmpy ctl SOCKET COMMAND``: a client for people of a running kvmpy's API.

It speaks HTTP/1.1 over the API's Unix socket with the standard library
(http.client on an AF_UNIX socket) and nothing more: Firecracker's routes for
the lifecycle (``GET /``, ``PATCH /vm``) and kvmpy's monitor routes under
``/kvmpy/``. Every command prints a table for people, or with ``--json`` the
API's answer as it came. A failure (no socket, nobody listening, a refused
request) is one line on stderr and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import string
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from kvmpy.errors import ConfigError, HostError

#: How long one request may take: monitor queries wait for a vCPU's next exit at most.
TIMEOUT = 10.0
#: The largest answer the client reads (a 4 KiB dump is about 9 KiB of JSON).
MAX_ANSWER = 16 << 20


class ApiError(HostError):
    """The API could not be reached, or it refused the request (the message says which)."""


class _UnixConnection(http.client.HTTPConnection):
    """An HTTP connection whose transport is a Unix stream socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class ApiClient:
    """One kvmpy API socket; each call is one request on a fresh connection."""

    def __init__(self, socket_path: str, timeout: float = TIMEOUT) -> None:
        self.socket_path = socket_path
        self.timeout = timeout

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        """The decoded JSON answer (None for 204 No Content); ApiError on any failure."""
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        connection = _UnixConnection(self.socket_path, self.timeout)
        try:
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            raw = response.read(MAX_ANSWER + 1)
        except FileNotFoundError:
            raise ApiError(f"no API socket at {self.socket_path} (start kvmpy with --api-sock)") from None
        except ConnectionRefusedError:
            raise ApiError(f"nothing listens on {self.socket_path} (has the VMM exited?)") from None
        except PermissionError:
            raise ApiError(f"no permission to connect to {self.socket_path}") from None
        except TimeoutError:
            raise ApiError(f"{method} {path}: no answer within {self.timeout:.0f} s") from None
        except (OSError, http.client.HTTPException) as error:
            raise ApiError(f"{method} {path}: {error}") from None
        finally:
            connection.close()
        if len(raw) > MAX_ANSWER:
            raise ApiError(f"{method} {path}: the answer is larger than {MAX_ANSWER >> 20} MiB")
        return self._decode(method, path, response.status, raw)

    @staticmethod
    def _decode(method: str, path: str, status: int, raw: bytes) -> Any:
        answer: Any = None
        if raw:
            try:
                answer = json.loads(raw)
            except ValueError:
                if status < 300:
                    raise ApiError(f"{method} {path}: the answer is not JSON") from None
        if status >= 300:
            fault = answer.get("fault_message") if isinstance(answer, dict) else None
            detail = fault if fault else raw.decode("utf-8", "replace").strip() or "no details"
            raise ApiError(f"{method} {path}: {status}: {detail}")
        return answer

    def get(self, path: str, **query: object) -> Any:
        given = {key: str(value) for key, value in query.items() if value is not None}
        return self.request("GET", path + ("?" + urllib.parse.urlencode(given) if given else ""))


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


def _size(size: int) -> str:
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift} {unit}"
    return str(size) if size < 1024 else f"{size:#x}"


def _flags(names: Iterable[str]) -> str:
    return " ".join(names) or "-"


def table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned columns two spaces apart, with a rule under the header."""
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()

    return [line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)]


# --- formatting each answer -------------------------------------------------------------
def format_status(info: dict[str, Any]) -> str:
    return (
        f"{info.get('app_name', 'kvmpy')} {info.get('vmm_version', '?')}  id {info.get('id', '?')}"
        f"  state {info.get('state', '?')}"
    )


def format_registers(regs: dict[str, Any]) -> str:
    general = regs["general"]
    out = [f"vCPU {regs['vcpu']}: {regs['cpu_mode']}, CPL {regs['cpl']}, paging {regs['paging_mode']}"]
    names = [name for name in general if name != "rip"]
    for start in range(0, len(names), 4):
        out.append("  ".join(f"{name.upper():<3}={general[name]:016x}" for name in names[start : start + 4]))
    rflags = regs["rflags"]
    out.append(
        f"RIP={general['rip']:016x}  RFLAGS={rflags['value']:08x} [{_flags(rflags['flags'])}]"
        f"  IOPL={rflags['iopl']}"
    )
    out.append("")
    rows = []
    for name, seg in regs["segments"].items():
        bits = [
            b for b, on in (("P", seg["present"]), ("L", seg["l"]), ("DB", seg["db"]), ("G", seg["g"])) if on
        ]
        if seg["unusable"]:
            bits.append("unusable")
        rows.append(
            [
                name.upper(),
                f"{seg['selector']:#06x}",
                f"{seg['base']:016x}",
                f"{seg['limit']:#010x}",
                str(seg["dpl"]),
                _flags(bits),
                seg["type_name"],
            ]
        )
    out += table(["seg", "selector", "base", "limit", "DPL", "flags", "type"], rows)
    out.append("")
    for name, dtable in regs["descriptor_tables"].items():
        out.append(f"{name.upper()}  base={dtable['base']:016x}  limit={dtable['limit']:#06x}")
    for name, register in regs["control"].items():
        out.append(f"{name.upper():<9}={register['value']:016x} [{_flags(register['flags'])}]")
    return "\n".join(out)


def _rights(walk: dict[str, Any]) -> str:
    return " ".join(
        [
            "RW" if walk["writable"] else "RO",
            "US" if walk["user"] else "S",
            "X" if walk["executable"] else "NX",
        ]
    )


def format_translate(answer: dict[str, Any]) -> str:
    walk = answer["walk"]
    out = [f"GVA {answer['gva']:#x} on vCPU {answer['vcpu']}: {answer['mode']} paging, CR3 {walk['cr3']:#x}"]
    if walk["steps"]:
        rows = [
            [
                f"{step['level']} {step['table_name']}",
                f"{step['table']:#x}",
                str(step["index"]),
                f"{step['entry_address']:#x}",
                f"{step['entry']:#0{2 + 2 * step['entry_size']}x}",
                _flags(step["flags"]),
                step["maps"],
            ]
            for step in walk["steps"]
        ]
        out += table(["level", "table", "index", "entry at", "entry", "flags", "maps"], rows)
    gpa = answer["gpa"]
    if gpa is None:
        out.append(f"GVA {answer['gva']:#x} -> no translation: {walk['fault']}")
    else:
        size = f"{_size(walk['page_size'])} page, " if walk["page_size"] else ""
        out.append(f"GVA {answer['gva']:#x} -> GPA {gpa:#x}  ({size}{_rights(walk)})")
    kvm = answer["kvm"]
    if kvm.get("error"):
        out.append(f"KVM_TRANSLATE: failed: {kvm['error']}")
    elif kvm.get("valid") is not None:
        said = f"GPA {kvm['gpa']:#x}" if kvm["valid"] else "no translation"
        verdict = "agrees" if answer["agrees_with_kvm"] else "DISAGREES with kvmpy's walk"
        out.append(f"KVM_TRANSLATE: {said} ({verdict})")
    if gpa is None:
        return "\n".join(out)
    slot = answer["slot"]
    if slot is None:
        where = f"the MMIO of {answer['device']}" if answer["device"] else "no RAM and no device"
        out.append(f"GPA {gpa:#x} -> {where}")
        return "\n".join(out)
    out.append(
        f"GPA {gpa:#x} -> memory slot {slot['slot']} [{slot['gpa_start']:#x}-{slot['gpa_end']:#x})"
        f" -> HVA {answer['hva']:#x}"
    )
    frame = answer["host_frame"]
    if frame["pfn"] is not None:
        out.append(f"HVA {answer['hva']:#x} -> host frame {frame['pfn']:#x} -> HPA {frame['hpa']:#x}")
    else:
        out.append(f"HVA {answer['hva']:#x} -> HPA unknown: {frame['note']}")
    return "\n".join(out)


_PRINTABLE = set(string.printable.encode()) - set(b"\t\n\r\x0b\x0c")


def hex_dump(address: int, data: bytes) -> list[str]:
    """16 bytes a line: address, hex in two groups of eight, and the printable characters."""
    lines = []
    start = address - address % 16
    for line_start in range(start, address + len(data), 16):
        cells, text = [], []
        for at in range(line_start, line_start + 16):
            if address <= at < address + len(data):
                byte = data[at - address]
                cells.append(f"{byte:02x}")
                text.append(chr(byte) if byte in _PRINTABLE else ".")
            else:
                cells.append("  ")
                text.append(" ")
        lines.append(f"{line_start:016x}  {' '.join(cells[:8])}  {' '.join(cells[8:])}  |{''.join(text)}|")
    return lines


def format_memory(answer: dict[str, Any]) -> str:
    data = bytes.fromhex(answer["data"])
    space = "GPA" if answer["physical"] else "GVA"
    out = [f"{answer['length']} bytes at {space} {answer['address']:#x}"]
    if not answer["physical"]:
        for page in answer["pages"]:
            out.append(f"  GVA {page['gva']:#x} -> GPA {page['gpa']:#x} ({page['length']} bytes)")
    return "\n".join([*out, *hex_dump(answer["address"], data)])


def format_memory_tree(tree: dict[str, Any]) -> str:
    out = ["memory slots (guest RAM: loads and stores never exit)"]
    out += table(
        ["slot", "GPA range", "size", "host address", "flags"],
        [
            [
                str(s["slot"]),
                f"{s['gpa_start']:#012x}-{s['gpa_end'] - 1:#012x}",
                _size(s["size"]),
                f"{s['host_address']:#x}",
                _flags(s["flags"]),
            ]
            for s in tree["slots"]
        ],
    )
    for title, key, width in (
        ("MMIO (each access exits to the device, or signals an ioeventfd)", "mmio", 10),
        ("port I/O (each IN/OUT exits)", "pio", 6),
    ):
        out += ["", title]
        out += table(
            ["range", "size", "device"],
            [
                [f"{r['base']:#0{width}x}-{r['end'] - 1:#0{width}x}", _size(r["size"]), r["name"]]
                for r in tree[key]
            ],
        )
    out += ["", "PCI bus 0 (BARs as the guest placed them)"]
    rows = []
    for function in tree["pci"]:
        if not function["bars"]:
            rows.append([f"00:{function['slot']:02x}.0", function["name"], "-", "-", "-", "-"])
        for bar in function["bars"]:
            state = "decoding" if bar["enabled"] else "off"
            rows.append(
                [
                    f"00:{function['slot']:02x}.0",
                    function["name"],
                    f"BAR{bar['index']} {bar['kind']}",
                    f"{bar['address']:#x}",
                    _size(bar["size"]),
                    state,
                ]
            )
    out += table(["device", "name", "BAR", "address", "size", "state"], rows)
    return "\n".join(out)


def _vector_list(vectors: list[int]) -> str:
    return ",".join(f"{v:#x}" for v in vectors) or "-"


def _runs(rows: list[list[str]]) -> list[list[str]]:
    """Consecutive identical rows as one, numbered by their range ("0-23")."""
    merged: list[list[str]] = []
    first = 0
    for index, row in enumerate(rows):
        if index + 1 < len(rows) and rows[index + 1] == row:
            continue
        merged.append([str(first) if first == index else f"{first}-{index}", *row])
        first = index + 1
    return merged


def format_irq(irq: dict[str, Any]) -> str:
    out = []
    for name in ("pic_master", "pic_slave"):
        pic = irq[name]
        out.append(
            f"{name.replace('_', ' ').upper()}: vectors {pic['irq_base']:#04x}+  IMR {pic['imr']:#04x}"
            f"  IRR {pic['irr']:#04x}  ISR {pic['isr']:#04x}  ELCR {pic['elcr']:#04x}"
        )
    ioapic = irq["ioapic"]
    out += ["", f"IOAPIC id {ioapic['id']} at {ioapic['base_address']:#x}, IRR {ioapic['irr']:#x}"]
    rows = _runs(
        [
            [
                f"{pin['vector']:#04x}",
                pin["delivery_mode"],
                f"{pin['dest_mode']} {pin['destination']}",
                pin["trigger"],
                pin["polarity"],
                "masked" if pin["masked"] else "open",
                "remote-IRR" if pin["remote_irr"] else "",
            ]
            for pin in ioapic["pins"]
        ]
    )
    out += table(["pins", "vector", "mode", "destination", "trigger", "polarity", "mask", ""], rows)
    out += ["", "MSI routes (GSI -> message, from the guest's MSI-X tables)"]
    if irq["msi_routes"]:
        out += table(
            ["GSI", "address", "data", "destination", "vector", "mode", "trigger"],
            [
                [
                    str(r["gsi"]),
                    f"{r['address']:#x}",
                    f"{r['data']:#x}",
                    f"{r['dest_mode']} {r['destination']}",
                    f"{r['vector']:#04x}",
                    r["delivery_mode"],
                    r["trigger"],
                ]
                for r in irq["msi_routes"]
            ],
        )
    else:
        out.append("(none installed)")
    out += ["", "local APICs"]
    rows = []
    for lapic in irq["lapics"]:
        timer = lapic["timer"]
        timer_text = f"{timer['mode']} vector {timer['vector']:#04x}" + (" masked" if timer["masked"] else "")
        if timer["initial_count"]:
            timer_text += f" count {timer['current_count']}/{timer['initial_count']} div {timer['divide']}"
        rows.append(
            [
                str(lapic["vcpu"]),
                str(lapic["id"]) + (" x2APIC" if lapic["x2apic"] else ""),
                "yes" if lapic["enabled"] else "no",
                f"{lapic['tpr']:#04x}",
                _vector_list(lapic["isr"]),
                _vector_list(lapic["irr"]),
                timer_text,
                lapic["lint0"]["delivery_mode"] + (" masked" if lapic["lint0"]["masked"] else ""),
                lapic["lint1"]["delivery_mode"] + (" masked" if lapic["lint1"]["masked"] else ""),
            ]
        )
    out += table(["vCPU", "APIC id", "enabled", "TPR", "ISR", "IRR", "timer", "LINT0", "LINT1"], rows)
    return "\n".join(out)


def format_vcpus(answer: dict[str, Any]) -> str:
    rows = []
    for vcpu in answer["vcpus"]:
        reasons = sorted(vcpu["exits_by_reason"].items(), key=lambda item: -item[1])
        rows.append(
            [
                str(vcpu["vcpu"]),
                vcpu["state"],
                vcpu["mp_state"],
                str(vcpu["exits"]),
                f"{vcpu['guest_seconds']:.3f}",
                " ".join(f"{name}={count}" for name, count in reasons) or "-",
            ]
        )
    lines = [f"VM state: {answer['vm_state']}"]
    return "\n".join(
        lines + table(["vCPU", "state", "mp_state", "exits", "in guest s", "exits by reason"], rows)
    )


def format_rates(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Exit rates over the interval between two ``stats`` samples, per reason and per device."""
    seconds = after["sampled_at"] - before["sampled_at"]
    if seconds <= 0:
        return "the two samples are at the same time"
    vcpus = max(len(after["vcpus"]), 1)
    exits = after["total_exits"] - before["total_exits"]
    guest = after["guest_seconds"] - before["guest_seconds"]
    out = [
        f"last {seconds:.2f} s: {exits / seconds:.0f} exits/s,"
        f" vCPUs inside KVM_RUN {100 * guest / seconds / vcpus:.0f}% of the time"
        f"  (whole run: {after['total_exits']} exits in {after['wall_seconds']:.1f} s,"
        f" VM {after.get('vm_state', '?')})"
    ]
    previous = {row["reason"]: row for row in before["reasons"]}
    rows = []
    for row in after["reasons"]:
        old = previous.get(row["reason"], {"count": 0, "handle_ns": 0})
        count = row["count"] - old["count"]
        handled = row["handle_ns"] - old["handle_ns"]
        rows.append(
            [
                row["reason"],
                f"{count / seconds:.1f}",
                f"{handled / count / 1000:.1f}" if count else "-",
                str(row["count"]),
            ]
        )
    out += ["", *table(["exit reason", "per s", "handler us", "total"], rows)]
    devices = []
    earlier = {(row["name"], row["base"]): row for row in before["pio"] + before["mmio"]}
    for kind, key in (("pio", "pio"), ("mmio", "mmio")):
        for row in after[key]:
            old = earlier.get((row["name"], row["base"]), {"reads": 0, "writes": 0})
            reads, writes = row["reads"] - old["reads"], row["writes"] - old["writes"]
            devices.append(
                [
                    row["name"],
                    kind,
                    f"{reads / seconds:.1f}",
                    f"{writes / seconds:.1f}",
                    str(row["reads"] + row["writes"]),
                ]
            )
    devices.sort(key=lambda cells: -(float(cells[2]) + float(cells[3])))
    out += ["", *table(["device", "bus", "reads/s", "writes/s", "total accesses"], devices)]
    return "\n".join(out)


# --- the commands -----------------------------------------------------------------------
def _print(args: argparse.Namespace, answer: Any, formatter: Callable[[Any], str]) -> int:
    print(json.dumps(answer, indent=2) if args.json else formatter(answer))
    return 0


def _client(args: argparse.Namespace) -> ApiClient:
    return ApiClient(args.socket, timeout=args.timeout)


def _status(args: argparse.Namespace) -> int:
    return _print(args, _client(args).request("GET", "/"), format_status)


def _set_state(state: str) -> Callable[[argparse.Namespace], int]:
    def change(args: argparse.Namespace) -> int:
        client = _client(args)
        client.request("PATCH", "/vm", {"state": state})
        return _print(args, client.request("GET", "/"), format_status)

    return change


def _quit(args: argparse.Namespace) -> int:
    _client(args).request("PUT", "/kvmpy/stop", {"reason": "stopped by kvmpy ctl"})
    if not args.json:
        print("stop requested")
    return 0


def _stats(args: argparse.Namespace) -> int:
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
    return _print(args, _client(args).get("/kvmpy/regs", vcpu=args.vcpu), format_registers)


def _translate(args: argparse.Namespace) -> int:
    answer = _client(args).get("/kvmpy/translate", gva=f"{args.gva:#x}", vcpu=args.vcpu)
    return _print(args, answer, format_translate)


def _examine(args: argparse.Namespace) -> int:
    answer = _client(args).get(
        "/kvmpy/memory",
        address=f"{args.address:#x}",
        length=args.length,
        space="gpa" if args.physical else "gva",
        vcpu=args.vcpu,
    )
    return _print(args, answer, format_memory)


def _query(path: str, formatter: Callable[[Any], str]) -> Callable[[argparse.Namespace], int]:
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
        "mtree", _query("/kvmpy/mtree", format_memory_tree), "memory slots, MMIO and port ranges, PCI BARs"
    )
    command("irq", _query("/kvmpy/irq", format_irq), "PICs, IOAPIC redirections, MSI routes, local APICs")
    command("vcpus", _query("/kvmpy/vcpus", format_vcpus), "each vCPU's state, exits and time in the guest")


__all__ = [
    "ApiClient",
    "ApiError",
    "format_irq",
    "format_memory",
    "format_memory_tree",
    "format_rates",
    "format_registers",
    "format_status",
    "format_translate",
    "format_vcpus",
    "hex_dump",
    "register",
]
