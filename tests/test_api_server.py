"""ApiServer on a real Unix socket: keep-alive, many clients, hostile clients, the size limit,
a failing VMM, closing, and how soon a fresh process answers GET /."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy.api.server import MAX_CONNECTIONS, ApiServer, DeferredSubmit
from kvmpy.errors import HostError
from kvmpy.testing.fake_vmm import FakeVmm
from kvmpy.vmm import actions as a

SRC = Path(__file__).resolve().parents[1] / "src"


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket: the standard library's keep-alive client."""

    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=10)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


@pytest.fixture
def vmm() -> FakeVmm:
    return FakeVmm()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "api.sock"


@pytest.fixture
def server(sock_path: Path, vmm: FakeVmm) -> Iterator[ApiServer]:
    with ApiServer(sock_path, vmm.submit) as api:
        yield api


def request(conn: http.client.HTTPConnection, method: str, path: str, body: object = None):
    data = None if body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    response = conn.getresponse()
    raw = response.read()
    return response, (json.loads(raw) if raw else None)


def raw_exchange(path: Path, data: bytes, *, half_close: bool = True) -> bytes:
    """Send ``data`` on a fresh connection and read until the server closes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


def still_answers(path: Path) -> None:
    conn = UnixHTTPConnection(path)
    response, body = request(conn, "GET", "/")
    conn.close()
    assert response.status == 200 and body["app_name"] == "kvmpy"


def test_keep_alive_serves_a_whole_configuration_on_one_connection(server: ApiServer, vmm: FakeVmm) -> None:
    conn = UnixHTTPConnection(server.path)
    response, _ = request(conn, "PUT", "/boot-source", {"kernel_image_path": "/k"})
    first_socket = conn.sock
    assert response.status == 204 and response.getheader("Content-Type") is None
    response, _ = request(conn, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 128})
    assert response.status == 204
    response, config = request(conn, "GET", "/vm/config")
    assert response.status == 200 and response.getheader("Content-Type") == "application/json"
    assert config["machine-config"]["vcpu_count"] == 2
    response, fault = request(conn, "PUT", "/drives/x", {"drive_id": "y", "is_root_device": False})
    assert response.status == 400 and "does not match" in fault["fault_message"]
    response, _ = request(conn, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert response.status == 204
    assert conn.sock is first_socket  # never reconnected
    conn.close()
    assert vmm.state is a.VmState.RUNNING


def test_many_sequential_clients(server: ApiServer) -> None:
    for _ in range(3 * MAX_CONNECTIONS):
        still_answers(server.path)


def test_a_silent_client_does_not_hold_up_others(server: ApiServer) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.connect(str(server.path))
        silent.sendall(b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 40\r\n\r\n{")
        still_answers(server.path)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\x01\x02\xff garbage\r\n\r\n",
        b"GET /\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n",
    ],
)
def test_garbage_gets_a_400_and_the_server_goes_on(server: ApiServer, garbage: bytes) -> None:
    answer = raw_exchange(server.path, garbage)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["fault_message"].startswith("Invalid HTTP request")
    still_answers(server.path)


@pytest.mark.parametrize(
    "partial",
    [
        b'PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"kernel',
        b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Le",
        b'PUT /boot-source HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{"ke',
    ],
)
def test_a_client_that_disconnects_mid_request(server: ApiServer, vmm: FakeVmm, partial: bytes) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(server.path))
        s.sendall(partial)
    still_answers(server.path)
    assert vmm.actions == [a.GetInstanceInfo()]  # the cut request never became an action


def test_a_body_over_the_limit_is_refused_from_its_content_length(server: ApiServer, vmm: FakeVmm) -> None:
    head = b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 51201\r\n\r\n"
    answer = raw_exchange(server.path, head + b"x" * 51201)
    assert answer.startswith(b"HTTP/1.1 400")
    message = "Request payload with size 51201 is larger than the limit of 51200 allowed by server."
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1]) == {"fault_message": message}
    assert vmm.actions == []
    still_answers(server.path)


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(server: ApiServer, vmm: FakeVmm) -> None:
    chunk = b"%x\r\n%s\r\n" % (30000, b"x" * 30000)
    head = b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = raw_exchange(server.path, head + chunk * 2 + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"is larger than the limit of 51200" in answer
    assert vmm.actions == []
    still_answers(server.path)


def test_a_body_of_exactly_the_limit_is_taken(server: ApiServer, vmm: FakeVmm) -> None:
    empty = json.dumps({"kernel_image_path": "/k", "boot_args": ""})
    body = json.dumps({"kernel_image_path": "/k", "boot_args": "x" * (51200 - len(empty))})
    assert len(body) == 51200
    conn = UnixHTTPConnection(server.path)
    response, _ = request(conn, "PUT", "/boot-source", json.loads(body))
    assert response.status == 204
    assert vmm.config.cmdline == "x" * (51200 - len(empty))


def test_expect_100_continue(server: ApiServer, vmm: FakeVmm) -> None:
    body = b'{"kernel_image_path": "/k"}'
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(server.path))
        s.sendall(
            b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body)
        )
        assert s.recv(1024).startswith(b"HTTP/1.1 100")
        s.sendall(body)
        assert s.recv(1024).startswith(b"HTTP/1.1 204")
    assert vmm.actions == [a.ConfigureBootSource(Path("/k"))]


def test_pipelined_requests_are_answered_in_order(server: ApiServer) -> None:
    one = b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
    two = b"GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    answer = raw_exchange(server.path, one + two, half_close=False)
    assert answer.count(b"HTTP/1.1 ") == 2
    assert answer.index(b"firecracker_version") < answer.index(b"Invalid request method and/or path")


def test_a_failing_submit_is_a_500_and_the_connection_goes_on(server: ApiServer, vmm: FakeVmm) -> None:
    conn = UnixHTTPConnection(server.path)
    vmm.fail_next = OSError(5, "Input/output error")
    response, body = request(conn, "GET", "/vm/config")
    assert response.status == 500
    assert "Input/output error" in body["fault_message"]
    response, _ = request(conn, "GET", "/")
    assert response.status == 200


def test_close_removes_the_socket_and_ends_open_connections(sock_path: Path, vmm: FakeVmm) -> None:
    api = ApiServer(sock_path, vmm.submit)
    api.start()
    idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    idle.connect(str(sock_path))
    still_answers(sock_path)
    api.close()
    assert not sock_path.exists()
    idle.settimeout(5)
    assert idle.recv(10) == b""  # the server hung up on the idle keep-alive client
    idle.close()
    with pytest.raises(ConnectionRefusedError if sock_path.exists() else FileNotFoundError):
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect(str(sock_path))


def test_a_path_in_use_is_refused_like_firecracker(sock_path: Path, vmm: FakeVmm) -> None:
    sock_path.write_text("someone else's file")
    with pytest.raises(
        HostError, match="Failed to open the API socket at: .*Check that it is not already used"
    ):
        ApiServer(sock_path, vmm.submit).start()
    assert sock_path.read_text() == "someone else's file"


def test_deferred_submit_holds_requests_until_the_vmm_is_attached(sock_path: Path, vmm: FakeVmm) -> None:
    submit = DeferredSubmit()
    with ApiServer(sock_path, submit):
        conn = UnixHTTPConnection(sock_path)
        conn.request("GET", "/")
        time.sleep(0.1)
        submit.attach(vmm.submit)
        assert conn.getresponse().status == 200


READY_SCRIPT = textwrap.dedent(
    """
    import sys
    from kvmpy.api.server import ApiServer, DeferredSubmit
    submit = DeferredSubmit()
    ApiServer(sys.argv[1], submit).start()
    from kvmpy.testing.fake_vmm import FakeVmm  # what a VMM would import after binding
    submit.attach(FakeVmm("ready-test").submit)
    sys.stdin.read()  # serve until the test closes stdin
    """
)


def time_to_first_answer(sock_path: Path) -> float:
    """Seconds from spawning a fresh interpreter to its answer to GET /."""
    env = dict(os.environ, PYTHONPATH=str(SRC))
    start = time.perf_counter()
    child = subprocess.Popen(
        [sys.executable, "-c", READY_SCRIPT, str(sock_path)], stdin=subprocess.PIPE, env=env
    )
    try:
        while True:
            try:
                conn = UnixHTTPConnection(sock_path)
                response, body = request(conn, "GET", "/")
                break
            except (FileNotFoundError, ConnectionRefusedError):
                assert child.poll() is None, "the server process died"
                time.sleep(0.001)
        elapsed = time.perf_counter() - start
        assert response.status == 200
        assert body == {
            "id": "ready-test",
            "state": "Not started",
            "vmm_version": "0.1.0",
            "app_name": "kvmpy",
        }
        return elapsed
    finally:
        child.communicate(timeout=10)


def test_a_fresh_process_answers_get_root(tmp_path: Path) -> None:
    times = [time_to_first_answer(tmp_path / f"ready{i}.sock") for i in range(3)]
    print(f"GET / answered {', '.join(f'{t * 1000:.0f}' for t in times)} ms after process start")


def test_connections_over_the_cap_are_closed_and_the_server_recovers(server: ApiServer) -> None:
    idle = []
    for _ in range(MAX_CONNECTIONS):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(server.path))
        idle.append(s)
    time.sleep(0.2)  # let the accept thread admit them all
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
        extra.settimeout(5)
        extra.connect(str(server.path))
        assert extra.recv(10) == b""  # refused by closing
    for s in idle:
        s.close()
    deadline = time.monotonic() + 5
    while True:
        try:
            still_answers(server.path)
            break
        except (ConnectionError, http.client.RemoteDisconnected):
            assert time.monotonic() < deadline
            time.sleep(0.05)
