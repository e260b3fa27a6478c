"""The control plane: how soon the API answers after process start, and what a call costs.

kvmpy: ``kvmpy run --api-sock PATH`` with nothing configured (Firecracker's
model: the VM is configured through the socket after the process starts), polled
every millisecond until ``GET /`` is answered; then ``PUT /machine-config``
round trips on one kept-alive connection (as Firecracker's Go SDK keeps one).

QEMU has no such API. Its nearest is QMP: ``-qmp unix:PATH,server=on,wait=off``
with ``-S`` (the machine built, the guest not started), timed to the greeting,
then ``query-status`` round trips on the negotiated connection. The two are not
the same work: QEMU builds its whole machine before it greets, kvmpy answers
before any VM exists. What the pair says is how soon each VMM can be driven by a
tool, and what one control call costs on an open connection.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kvmpy.bench.measure import command
from kvmpy.bench.metric import Metric, Target
from kvmpy.bench.qmp import Qmp
from kvmpy.bench.watch import WatchedProcess
from kvmpy.errors import HostError
from kvmpy.testing.guests import guest_path

WHERE = "this machine"
CALLS = 50  # control calls timed per process
MACHINE_CONFIG = {"vcpu_count": 1, "mem_size_mib": 256}


class _UnixHttp(http.client.HTTPConnection):
    """HTTP/1.1 to a Unix socket; the connection stays open between requests."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = str(path)

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock

    def call(self, method: str, path: str, body: object | None = None) -> tuple[int, bytes]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        self.request(method, path, body=payload, headers=headers)
        response = self.getresponse()
        return response.status, response.read()


def _poll(attempt: Callable[[], bool], timeout: float, what: str) -> float:
    """perf_counter() when ``attempt`` first succeeds, trying every millisecond."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if attempt():
                return time.perf_counter()
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        if time.monotonic() > deadline:
            raise HostError(f"{what} did not answer within {timeout:.0f} s")
        time.sleep(0.001)


def _answer_root(path: Path) -> bool:
    """One ``GET /`` on a fresh connection; True once kvmpy answers it."""
    connection = _UnixHttp(path)
    try:
        status, body = connection.call("GET", "/")
    finally:
        connection.close()
    if status != 200 or b'"state"' not in body:
        raise HostError(f"GET / answered {status}: {body[:200]!r}")
    return True


def _api_command(path: Path) -> list[str]:
    return [sys.executable, "-m", "kvmpy", "run", "--api-sock", str(path)]


def kvmpy_api_sample(scratch: Path, calls: int = CALLS) -> tuple[float, float]:
    """(seconds from process start to ``GET /`` answered, median seconds per PUT /machine-config)."""
    path = scratch / "kvmpy-api.sock"
    process = WatchedProcess(_api_command(path), "kvmpy run")
    try:
        ready = _poll(lambda: _answer_root(path), 30, "kvmpy's API") - process.started
        connection = _UnixHttp(path)
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            status, body = connection.call("PUT", "/machine-config", MACHINE_CONFIG)
            times.append(time.perf_counter() - began)
            if status != 204:
                raise HostError(f"PUT /machine-config answered {status}: {body[:200]!r}")
        connection.close()
    finally:
        process.stop()
        path.unlink(missing_ok=True)
    return ready, sorted(times)[len(times) // 2]


def api_profile() -> str:
    """py-spy of ``kvmpy run --api-sock`` from its start until ``GET /`` is answered."""
    from kvmpy.bench.profile import profile_command

    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-api-") as scratch:
        path = Path(scratch) / "profiled.sock"

        def until_ready() -> None:
            _poll(lambda: _answer_root(path), 60, "kvmpy's API")

        return profile_command(
            _api_command(path),
            "API readiness (kvmpy run --api-sock, start to GET / answered)",
            what="`kvmpy run --api-sock`",
            while_running=until_ready,
        )


def qemu_qmp_sample(scratch: Path, calls: int = CALLS) -> tuple[float, float]:
    """(seconds from process start to the QMP greeting, median seconds per query-status)."""
    path = scratch / "qemu-qmp.sock"
    argv = command("qemu", guest_path("hello"), "") + ["-S", "-qmp", f"unix:{path},server=on,wait=off"]
    process = WatchedProcess(argv, "QEMU")
    try:
        qmp = Qmp.connect(path)  # retries every millisecond until QEMU listens, then reads the greeting
        ready = time.perf_counter() - process.started
        times = []
        for _ in range(calls):
            began = time.perf_counter()
            status = qmp.execute("query-status")
            times.append(time.perf_counter() - began)
            if status.get("status") != "prelaunch":
                raise HostError(f"QEMU -S says it is {status}")
        qmp.execute("quit")
        qmp.close()
    finally:
        process.stop()
    return ready, sorted(times)[len(times) // 2]


def api_metrics(repetitions: int, progress: Callable[[str], None]) -> list[Metric]:
    ready = Metric(
        "api_ready",
        "Process start to the control socket answering (kvmpy GET /, QEMU's QMP greeting)",
        "ms",
        WHERE,
        target=Target(absolute=100),
        note="kvmpy run --api-sock with nothing configured against QEMU -S -qmp; QEMU builds its "
        "machine before it greets, kvmpy answers before a VM exists (target from issue 11)",
    )
    call = Metric(
        "api_call",
        "Control call round trip on an open connection (kvmpy PUT /machine-config, QEMU query-status)",
        "µs",
        WHERE,
        target=Target(ratio=1.0),
        note=f"median of {CALLS} calls per process; one HTTP/1.1 connection kept alive, one QMP session",
    )
    with tempfile.TemporaryDirectory(prefix="kvmpy-bench-api-") as scratch:
        for index in range(repetitions):
            seconds, per_call = kvmpy_api_sample(Path(scratch))
            ready.kvmpy.append(seconds * 1000)
            call.kvmpy.append(per_call * 1e6)
            seconds, per_call = qemu_qmp_sample(Path(scratch))
            ready.qemu.append(seconds * 1000)
            call.qemu.append(per_call * 1e6)
            progress(f"API readiness and calls: {index + 1}/{repetitions}")
    return [ready, call]


__all__ = ["api_metrics", "api_profile", "kvmpy_api_sample", "qemu_qmp_sample"]
