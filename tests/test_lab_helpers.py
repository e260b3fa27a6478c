"""The lab scenarios' host-side helpers, on this machine: the knock, the VMM's pid and memory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from kvmpy.lab.api_driver import ApiDriver
from kvmpy.lab.balloon_driver import resident_kib
from kvmpy.lab.knock import knock


def test_a_knock_waits_for_the_listener_and_closes_at_once() -> None:
    with socket.socket() as probe:  # a free port, listened on only after a while
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    accepted: list[bytes] = []

    def listen_later() -> None:
        time.sleep(1.2)
        with socket.create_server(("127.0.0.1", port)) as server:
            connection, _ = server.accept()
            with connection:
                accepted.append(connection.recv(16))  # b"": the knock closed without sending

    listener = threading.Thread(target=listen_later)
    listener.start()
    assert knock("127.0.0.1", port, 10.0)
    listener.join(10)
    assert accepted == [b""]


def test_nobody_answering_is_exit_status_1_and_one_line() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy.lab.knock", "127.0.0.1", str(port), "0.6"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 1
    expected = f"kvmpy.lab.knock: nobody answered on 127.0.0.1:{port} within 0.6 s"
    assert done.stderr.strip().splitlines() == [expected]


def test_the_driver_finds_the_vmm_behind_the_api_socket(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    try:
        assert ApiDriver(str(path), str).vmm_pid() == os.getpid()
    finally:
        server.close()


def test_resident_memory_grows_with_touched_pages() -> None:
    before = resident_kib(os.getpid())
    block = bytearray(64 << 20)
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    assert resident_kib(os.getpid()) - before >= 60 << 10
    del block
