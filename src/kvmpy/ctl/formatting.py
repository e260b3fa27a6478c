"""How ``kvmpy ctl`` prints the monitor's answers: tables for people, from the API's JSON."""

from __future__ import annotations

import string
from collections.abc import Iterable
from typing import Any


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
    for device in tree.get("iommu", []):
        out += ["", f"IOMMU domain of {device['id']} ({device['bdf']}, group {device['iommu_group']}):"
                " device DMA to IOVA = GPA lands at the host address"]  # fmt: skip
        out += table(
            ["IOVA range", "size", "host address"],
            [
                [f"{m['iova_start']:#012x}-{m['iova_end'] - 1:#012x}", _size(m["size"]),
                 f"{m['host_address']:#x}"]  # fmt: skip
                for m in device["dma"]
            ],
        )
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
    exits = after["total_exits"] - before["total_exits"]
    earlier_ns = {row["vcpu"]: row["guest_ns"] for row in before["vcpus"]}
    # Time inside KVM_RUN is added up at each exit: a vCPU blocked in the kernel shows 0 until it exits.
    in_guest = ", ".join(
        f"vCPU {row['vcpu']} {100 * (row['guest_ns'] - earlier_ns.get(row['vcpu'], 0)) / 1e9 / seconds:.0f}%"
        for row in after["vcpus"]
    )
    out = [
        f"last {seconds:.2f} s: {exits / seconds:.0f} exits/s; inside KVM_RUN (counted at exits): {in_guest}",
        f"whole run: {after['total_exits']} exits in {after['wall_seconds']:.1f} s,"
        f" VM {after.get('vm_state', '?')}",
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
    kernel_before, kernel_after = before.get("kernel", {}), after.get("kernel", {})
    counters = [
        [name, f"{(value - kernel_before.get(name, 0)) / seconds:.1f}", str(value)]
        for name, value in kernel_after.items()
        if value != kernel_before.get(name, 0)
    ]
    if counters:
        out += ["", "KVM's own counters (all its exits, kvmpy's included; its MMU's faults):"]
        out += table(["KVM counter", "per s", "total"], counters)
    return "\n".join(out)


__all__ = [
    "format_irq",
    "format_memory",
    "format_memory_tree",
    "format_rates",
    "format_registers",
    "format_status",
    "format_translate",
    "format_vcpus",
    "hex_dump",
    "table",
]
