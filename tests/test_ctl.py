"""``kvmpy ctl``: its formatting of recorded monitor answers, and its HTTP over a Unix socket.

The answers in tests/data/monitor were recorded from the live counter guest
by tools/record_monitor_answers.py. The transport tests serve them from a
small http.server on a Unix socket, so no VMM runs here.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from kvmpy.cli import main
from kvmpy.ctl import formatting as ctl
from kvmpy.ctl import parse_address, parse_length

RECORDED = Path(__file__).parent / "data" / "monitor"


def recorded(name: str) -> Any:
    return json.loads((RECORDED / f"{name}.json").read_text())


# --- formatting recorded answers ----------------------------------------------------------
def test_registers_show_every_register_and_decoded_flags() -> None:
    regs = recorded("regs")
    text = ctl.format_registers(regs)
    assert (
        text.splitlines()[0] == f"vCPU 0: {regs['cpu_mode']}, CPL {regs['cpl']}, paging {regs['paging_mode']}"
    )
    for name, value in regs["general"].items():
        assert f"{name.upper():<3}={value:016x}" in text
    cr0 = regs["control"]["cr0"]
    assert f"CR0      ={cr0['value']:016x} [{' '.join(cr0['flags'])}]" in text
    cs = regs["segments"]["cs"]
    assert any(line.startswith("CS ") and cs["type_name"] in line for line in text.splitlines())
    assert f"GDT  base={regs['descriptor_tables']['gdt']['base']:016x}" in text


def test_translate_shows_each_level_and_the_whole_chain() -> None:
    answer = recorded("translate")
    text = ctl.format_translate(answer)
    for step in answer["walk"]["steps"]:
        row = next(
            line for line in text.splitlines() if line.startswith(f"{step['level']} {step['table_name']}")
        )
        assert f"{step['entry']:#018x}" in row and " ".join(step["flags"]) in row and step["maps"] in row
    assert f"GVA {answer['gva']:#x} -> GPA {answer['gpa']:#x}" in text
    assert f"KVM_TRANSLATE: GPA {answer['kvm']['gpa']:#x} (agrees)" in text
    assert f"-> memory slot {answer['slot']['slot']} " in text and f"HVA {answer['hva']:#x}" in text
    frame = answer["host_frame"]
    if frame["pfn"] is not None:
        assert f"-> HPA {frame['hpa']:#x}" in text
    else:
        assert frame["note"] in text


def test_translate_of_an_unmapped_address_says_where_the_walk_stopped() -> None:
    answer = recorded("translate_unmapped")
    text = ctl.format_translate(answer)
    assert f"-> no translation: {answer['walk']['fault']}" in text
    assert "KVM_TRANSLATE: no translation (agrees)" in text
    assert "HVA" not in text


def test_translate_to_mmio_names_the_device() -> None:
    answer = recorded("translate_mmio")
    text = ctl.format_translate(answer)
    assert text.splitlines()[-1] == f"GPA {answer['gpa']:#x} -> the MMIO of {answer['device']}"


def test_hex_dump_aligns_lines_and_shows_printable_bytes() -> None:
    lines = ctl.hex_dump(0x1003, b"kvmpy\x00\x01 x")
    assert lines == [
        "0000000000001000  " + " " * 9 + "6b 76 6d 70 79  00 01 20 78" + " " * 12 + "  |   kvmpy.. x    |"
    ]
    assert len(ctl.hex_dump(0x0, bytes(range(48)))) == 3
    assert len(ctl.hex_dump(0xF, bytes(2))) == 2  # two bytes across a line boundary


def test_memory_dump_of_the_banner() -> None:
    answer = recorded("memory_physical")
    text = ctl.format_memory(answer)
    assert text.splitlines()[0] == f"{answer['length']} bytes at GPA {answer['address']:#x}"
    assert "|kvmpy counter gu|" in text
    crossing = ctl.format_memory(recorded("memory"))
    assert crossing.count(" -> GPA ") == 2  # one line per page the range touched


def test_memory_tree_lists_slots_ranges_and_bars() -> None:
    tree = recorded("mtree")
    text = ctl.format_memory_tree(tree)
    for slot in tree["slots"]:
        assert f"{slot['host_address']:#x}" in text
    for row in tree["pio"]:
        assert f"{row['base']:#06x}-{row['end'] - 1:#06x}" in text and row["name"] in text
    bars = [bar for function in tree["pci"] for bar in function["bars"]]
    assert bars and all(f"BAR{bar['index']} {bar['kind']}" in text for bar in bars)


def _pin_cells(text: str) -> list[str]:
    section = text.split("IOAPIC")[1].split("MSI routes")[0]
    return [line.split()[0] for line in section.splitlines()[3:] if line.strip()]


def test_irq_merges_identical_ioapic_pins_and_lists_every_lapic() -> None:
    irq = recorded("irq")
    text = ctl.format_irq(irq)
    numbers = [n for cell in _pin_cells(text) for n in _expand(cell)]
    assert numbers == list(range(len(irq["ioapic"]["pins"])))
    assert text.count("\n", text.index("local APICs")) == len(irq["lapics"]) + 2
    irq["ioapic"]["pins"][4].update(vector=0x34, masked=False)  # as Linux programs COM1's pin
    assert _pin_cells(ctl.format_irq(irq)) == ["0-3", "4", "5-23"]
    assert "0x34" in ctl.format_irq(irq)


def _expand(cell: str) -> list[int]:
    first, _, last = cell.partition("-")
    return list(range(int(first), int(last or first) + 1))


def test_vcpus_table() -> None:
    answer = recorded("vcpus")
    text = ctl.format_vcpus(answer)
    for vcpu in answer["vcpus"]:
        row = text.splitlines()[3 + vcpu["vcpu"]]
        assert row.startswith(str(vcpu["vcpu"])) and vcpu["state"] in row and str(vcpu["exits"]) in row


def test_rates_between_two_samples() -> None:
    before, after = recorded("stats_before"), recorded("stats_after")
    text = ctl.format_rates(before, after)
    seconds = after["sampled_at"] - before["sampled_at"]
    old = {row["reason"]: row["count"] for row in before["reasons"]}
    for row in after["reasons"]:
        rate = (row["count"] - old.get(row["reason"], 0)) / seconds
        assert any(line.split()[:2] == [row["reason"], f"{rate:.1f}"] for line in text.splitlines())
    assert f"{(after['total_exits'] - before['total_exits']) / seconds:.0f} exits/s" in text
    earlier = {row["vcpu"]: row["guest_ns"] for row in before["vcpus"]}
    for row in after["vcpus"]:
        share = 100 * (row["guest_ns"] - earlier[row["vcpu"]]) / 1e9 / seconds
        assert f"vCPU {row['vcpu']} {share:.0f}%" in text.splitlines()[0]
    kernel = text.split("KVM's own counters")[1]
    exits = after["kernel"]["exits"] - before["kernel"]["exits"]
    assert any(line.split()[:2] == ["exits", f"{exits / seconds:.1f}"] for line in kernel.splitlines())


def test_addresses_parse_as_hex() -> None:
    assert parse_address("0xffff_8000_0000_0000") == 0xFFFF_8000_0000_0000
    assert parse_address("100dc0") == 0x100DC0
    assert parse_length("0x10") == 16 and parse_length("64") == 64


# --- the transport ----------------------------------------------------------------------
class FakeApi(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Answers from a table of (method, path) -> (status, body); records every request."""

    daemon_threads = True

    def __init__(self, path: str) -> None:
        self.answers: dict[tuple[str, str], list[tuple[int, bytes]]] = {}
        self.requests: list[tuple[str, str, dict[str, list[str]], bytes]] = []
        super().__init__(path, _Handler)

    def answer(self, method: str, path: str, status: int, body: object | bytes | None = None) -> None:
        raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        self.answers.setdefault((method, path), []).append((status, raw))


class _Handler(BaseHTTPRequestHandler):
    server: FakeApi
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        self.server.requests.append((self.command, url.path, urllib.parse.parse_qs(url.query), body))
        queue = self.server.answers.get((self.command, url.path))
        status, raw = queue.pop(0) if queue and len(queue) > 1 else queue[0] if queue else (404, b"")
        self.send_response(status)
        if raw:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_PATCH = do_PUT = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a Unix socket has no client address to log


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[FakeApi, str]]:
    path = str(tmp_path / "api.sock")
    server = FakeApi(path)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, path
    server.shutdown()
    server.server_close()


def test_status_pause_and_resume(api: tuple[FakeApi, str], capsys: pytest.CaptureFixture[str]) -> None:
    server, path = api
    server.answer(
        "GET", "/", 200, {"id": "vm1", "state": "Paused", "vmm_version": "0.1.0", "app_name": "kvmpy"}
    )
    server.answer("PATCH", "/vm", 204)
    assert main(["ctl", path, "pause"]) == 0
    assert capsys.readouterr().out == "kvmpy 0.1.0  id vm1  state Paused\n"
    assert main(["ctl", path, "resume"]) == 0
    patches = [json.loads(body) for method, _, _, body in server.requests if method == "PATCH"]
    assert patches == [{"state": "Paused"}, {"state": "Resumed"}]


def test_monitor_commands_send_the_query_and_print_the_answer(
    api: tuple[FakeApi, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, path = api
    server.answer("GET", "/kvmpy/translate", 200, recorded("translate"))
    server.answer("GET", "/kvmpy/memory", 200, recorded("memory_physical"))
    server.answer("GET", "/kvmpy/regs", 200, recorded("regs"))
    assert main(["ctl", path, "translate", "0x100dc0", "--vcpu", "1"]) == 0
    assert "KVM_TRANSLATE" in capsys.readouterr().out
    assert main(["ctl", path, "x", "100dc0", "51", "--physical"]) == 0
    assert "|kvmpy counter gu|" in capsys.readouterr().out
    assert main(["ctl", path, "--json", "regs", "1"]) == 0
    assert json.loads(capsys.readouterr().out) == recorded("regs")
    queries = {request_path: query for _, request_path, query, _ in server.requests}
    assert queries["/kvmpy/translate"] == {"gva": ["0x100dc0"], "vcpu": ["1"]}
    assert queries["/kvmpy/memory"] == {
        "address": ["0x100dc0"],
        "length": ["51"],
        "space": ["gpa"],
        "vcpu": ["0"],
    }
    assert queries["/kvmpy/regs"] == {"vcpu": ["1"]}


def test_stats_and_watch(api: tuple[FakeApi, str], capsys: pytest.CaptureFixture[str]) -> None:
    server, path = api
    server.answer("GET", "/kvmpy/stats", 200, recorded("stats_before"))
    server.answer("GET", "/kvmpy/stats", 200, recorded("stats_after"))
    assert main(["ctl", path, "stats"]) == 0
    assert capsys.readouterr().out == recorded("stats_before")["table"] + "\n"
    server.answers[("GET", "/kvmpy/stats")].insert(0, (200, json.dumps(recorded("stats_before")).encode()))
    assert main(["ctl", path, "stats", "--watch", "--interval", "0.01", "--count", "1"]) == 0
    out = capsys.readouterr().out
    assert "exit reason  per s" in out and "serial (COM1)" in out


def test_a_refused_request_is_one_line_and_exit_1(
    api: tuple[FakeApi, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, path = api
    server.answer("GET", "/kvmpy/memory", 400, {"fault_message": "GVA 0x10 has no translation: not present"})
    assert main(["ctl", path, "x", "0x10", "16"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err == "kvmpy: error: GET /kvmpy/memory: GVA 0x10 has no translation: not present\n"
    server.answer("GET", "/kvmpy/irq", 500, {"fault_message": "internal error: boom"})
    assert main(["ctl", path, "irq"]) == 1
    assert capsys.readouterr().err == "kvmpy: error: GET /kvmpy/irq: 500: internal error: boom\n"


def test_an_answer_that_is_not_json_is_an_error(
    api: tuple[FakeApi, str], capsys: pytest.CaptureFixture[str]
) -> None:
    server, path = api
    server.answer("GET", "/kvmpy/vcpus", 200, b"<html>")
    assert main(["ctl", path, "vcpus"]) == 1
    assert capsys.readouterr().err == "kvmpy: error: GET /kvmpy/vcpus: the answer is not JSON\n"


def test_no_socket_and_nobody_listening(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.sock")
    assert main(["ctl", missing, "status"]) == 1
    assert (
        capsys.readouterr().err == f"kvmpy: error: no API socket at {missing} (start kvmpy with --api-sock)\n"
    )
    stale = str(tmp_path / "stale.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(stale)  # the file exists, but nothing listens
        assert main(["ctl", stale, "status"]) == 1
    assert capsys.readouterr().err == f"kvmpy: error: nothing listens on {stale} (has the VMM exited?)\n"
