"""kvmpy run with --api-sock, --config-file and --no-api, as a user starts it (a child process):
the API and the config file are the only source of the VM's configuration."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
from pathlib import Path

from kvmpy.testing.process import kvmpy, start_kvmpy


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=20)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


def call(conn: UnixHTTPConnection, method: str, path: str, body: object = None) -> tuple[int, object]:
    conn.request(method, path, body=None if body is None else json.dumps(body))
    response = conn.getresponse()
    raw = response.read()
    return response.status, json.loads(raw) if raw else None


def ticks(path: Path) -> list[int]:
    text = path.read_text(errors="replace") if path.exists() else ""
    return [int(n) for n in re.findall(r"tick (\d+)\n", text)]


def wait_until(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_config_file_without_api_boots_and_runs_to_the_end(guests: Path, tmp_path: Path) -> None:
    out = tmp_path / "serial.out"
    config = {
        "boot-source": {"kernel_image_path": str(guests / "counter.elf"), "boot_args": "ticks=3 gap=1000"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "serial": {"serial_out_path": str(out)},
    }
    (tmp_path / "vm.json").write_text(json.dumps(config))
    result = kvmpy("run", "--config-file", str(tmp_path / "vm.json"), "--no-api")
    assert result.returncode == 0, result.stderr
    assert ticks(out) == [1, 2, 3]


def test_a_bad_config_file_is_one_line_and_no_vm(tmp_path: Path) -> None:
    bad = tmp_path / "vm.json"
    bad.write_text('{"boot-source": {"kernel_image_path": "/k", "bootargs": "x"}}')
    result = kvmpy("run", "--config-file", str(bad), "--no-api")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"kvmpy: error: config file {bad}: Object contains unknown field `bootargs` - at `$.boot-source`"
    ]


def test_the_api_alone_configures_starts_pauses_resumes_and_stops(guests: Path, tmp_path: Path) -> None:
    sock, out = tmp_path / "api.sock", tmp_path / "serial.out"
    process = start_kvmpy("run", "--api-sock", str(sock), "--id", "cli_test")
    try:
        wait_until(sock.exists)
        conn = UnixHTTPConnection(sock)
        assert call(conn, "GET", "/")[1] == {
            "id": "cli_test",
            "state": "Not started",
            "vmm_version": "0.1.0",
            "app_name": "kvmpy",
        }
        boot = {"kernel_image_path": str(guests / "counter.elf"), "boot_args": "gap=20000000"}
        assert call(conn, "PUT", "/boot-source", boot)[0] == 204
        assert call(conn, "PUT", "/serial", {"serial_out_path": str(out)})[0] == 204
        assert call(conn, "PUT", "/actions", {"action_type": "InstanceStart"})[0] == 204
        wait_until(lambda: len(ticks(out)) >= 3)

        assert call(conn, "PATCH", "/vm", {"state": "Paused"})[0] == 204
        paused = ticks(out)
        time.sleep(0.5)
        assert ticks(out) == paused
        assert call(conn, "GET", "/")[1]["state"] == "Paused"  # type: ignore[index]
        assert call(conn, "PATCH", "/vm", {"state": "Resumed"})[0] == 204
        wait_until(lambda: len(ticks(out)) > len(paused))
        assert ticks(out)[len(paused)] == paused[-1] + 1

        assert call(conn, "PUT", "/kvmpy/stop", {"reason": "test over"})[0] == 204
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.terminate()
            process.communicate(timeout=20)
    assert "Traceback" not in stderr
    assert not sock.exists()  # the server removed its socket
