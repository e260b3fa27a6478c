"""The router: every Firecracker route to the right action with the right values, and every
error as Firecracker answers it. No sockets here (tests/test_api_server.py has them)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy.api.messages import Request, Response
from kvmpy.api.router import Router
from kvmpy.testing.fake_vmm import FakeVmm
from kvmpy.vmm import actions as a
from kvmpy.vmm.config import DiskConfig, LoggerConfig, MetricsConfig, NetConfig, RateLimiterConfig, VfioConfig
from kvmpy.vmm.config import TokenBucketConfig as Bucket
from kvmpy.vmm.vmm import Vmm


@pytest.fixture
def vmm() -> FakeVmm:
    return FakeVmm()


def call(vmm: FakeVmm, method: str, path: str, body: object = None, query: dict | None = None) -> Response:
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return Router(vmm.submit).handle(Request(method, path, query or {}, raw))


def fault(response: Response) -> str:
    assert response.status == 400, response
    return json.loads(response.body)["fault_message"]


def boot(vmm: FakeVmm) -> None:
    assert call(vmm, "PUT", "/boot-source", {"kernel_image_path": "/k"}).status == 204
    assert call(vmm, "PUT", "/actions", {"action_type": "InstanceStart"}).status == 204


# --- success: each route and the action it makes --------------------------------------------
PUT_CASES = [
    (
        "/boot-source",
        {"kernel_image_path": "/vmlinux", "initrd_path": "/initrd", "boot_args": "console=ttyS0"},
        a.ConfigureBootSource(Path("/vmlinux"), Path("/initrd"), "console=ttyS0"),
    ),
    ("/boot-source", {"kernel_image_path": "/vmlinux"}, a.ConfigureBootSource(Path("/vmlinux"))),
    (
        "/machine-config",
        {"vcpu_count": 2, "mem_size_mib": 512},
        a.ConfigureMachine(2, 512, smt=False, track_dirty_pages=False, hugepages=False),
    ),
    (
        "/machine-config",
        {"vcpu_count": 1, "mem_size_mib": 128, "smt": True, "track_dirty_pages": True, "huge_pages": "2M"},
        a.ConfigureMachine(1, 128, smt=True, track_dirty_pages=True, hugepages=True),
    ),
    (
        "/machine-config",
        {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "None"},
        a.ConfigureMachine(1, 128, smt=False, track_dirty_pages=False, hugepages=False),
    ),
    (
        "/drives/rootfs",
        {"drive_id": "rootfs", "path_on_host": "/img", "is_root_device": True, "is_read_only": False},
        a.InsertBlockDevice(DiskConfig(Path("/img"), id="rootfs", is_root_device=True, cache_type="Unsafe")),
    ),
    (
        "/drives/scratch",
        {
            "drive_id": "scratch",
            "path_on_host": "/s",
            "is_root_device": False,
            "is_read_only": True,
            "partuuid": "abc-1",
            "cache_type": "Writeback",
            "io_engine": "Sync",
            "direct": True,
            "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100, "one_time_burst": 5}},
        },
        a.InsertBlockDevice(
            DiskConfig(
                Path("/s"),
                read_only=True,
                id="scratch",
                direct=True,
                partuuid="abc-1",
                cache_type="Writeback",
                rate_limiter=RateLimiterConfig(bandwidth=Bucket(1000, 100, 5)),
            )
        ),
    ),
    (
        "/network-interfaces/eth0",
        {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"},
        a.InsertNetworkDevice(NetConfig("tap0", "06:00:ac:10:00:02", "eth0")),
    ),
    (
        "/network-interfaces/eth1",
        {
            "iface_id": "eth1",
            "host_dev_name": "tap1",
            "rx_rate_limiter": {"ops": {"size": 10, "refill_time": 1000}},
            "tx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}},
        },
        a.InsertNetworkDevice(
            NetConfig(
                "tap1",
                id="eth1",
                rx_rate_limiter=RateLimiterConfig(ops=Bucket(10, 1000)),
                tx_rate_limiter=RateLimiterConfig(),
            )
        ),
    ),
    ("/entropy", {}, a.SetEntropyDevice()),
    (
        "/entropy",
        {"rate_limiter": {"bandwidth": {"size": 64, "refill_time": 10}}},
        a.SetEntropyDevice(RateLimiterConfig(bandwidth=Bucket(64, 10))),
    ),
    ("/serial", {"serial_out_path": "/tmp/serial.out"}, a.ConfigureSerial(Path("/tmp/serial.out"))),
    ("/serial", {"console": "virtio"}, a.ConfigureSerial(None, "virtio")),
    (
        "/logger",
        {"log_path": "/tmp/log", "level": "warn", "show_level": True, "module": "api"},
        a.ConfigureLogger(LoggerConfig(Path("/tmp/log"), "Warning", True, False, "api")),
    ),
    ("/logger", {"level": "DEBUG"}, a.ConfigureLogger(LoggerConfig(None, "Debug"))),
    ("/metrics", {"metrics_path": "/tmp/m"}, a.ConfigureMetrics(MetricsConfig(Path("/tmp/m")))),
    ("/actions", {"action_type": "InstanceStart"}, None),  # needs a kernel: checked below
]


@pytest.mark.parametrize(("path", "body", "action"), [c for c in PUT_CASES if c[2] is not None])
def test_put_before_start_makes_the_action(vmm: FakeVmm, path: str, body: dict, action: object) -> None:
    response = call(vmm, "PUT", path, body)
    assert response == Response(204), response
    assert vmm.actions == [action]


def test_actions_start_ctrl_alt_del_and_flush(vmm: FakeVmm) -> None:
    boot(vmm)
    assert vmm.actions[-1] == a.StartInstance()
    assert vmm.state is a.VmState.RUNNING
    for kind, action in (("SendCtrlAltDel", a.SendCtrlAltDel()), ("FlushMetrics", a.FlushMetrics())):
        assert call(vmm, "PUT", "/actions", {"action_type": kind}).status == 204
        assert vmm.actions[-1] == action


def test_pause_and_resume_through_patch_vm(vmm: FakeVmm) -> None:
    boot(vmm)
    assert call(vmm, "PATCH", "/vm", {"state": "Paused"}).status == 204
    assert vmm.actions[-1] == a.Pause()
    assert json.loads(call(vmm, "GET", "/").body)["state"] == "Paused"
    assert call(vmm, "PATCH", "/vm", {"state": "Resumed"}).status == 204
    assert vmm.actions[-1] == a.Resume()
    assert json.loads(call(vmm, "GET", "/").body)["state"] == "Running"


def test_patch_machine_config_changes_only_what_is_given(vmm: FakeVmm) -> None:
    assert call(vmm, "PATCH", "/machine-config", {"vcpu_count": 4}).status == 204
    assert vmm.actions == [a.ConfigureMachine(cpus=4, partial=True)]
    got = json.loads(call(vmm, "GET", "/machine-config").body)
    assert got == {
        "vcpu_count": 4,
        "mem_size_mib": 256,
        "smt": False,
        "track_dirty_pages": False,
        "huge_pages": "None",
    }


def test_a_vhost_user_drive_takes_a_socket_and_no_path(vmm: FakeVmm) -> None:
    body = {"drive_id": "v", "is_root_device": False, "socket": "/run/blk.sock"}
    call(vmm, "PUT", "/drives/v", body)
    disk = vmm.config.disks[0]
    assert disk.socket == Path("/run/blk.sock") and disk.vhost_user and disk.id == "v"
    body["path_on_host"] = "/img"
    assert "takes a socket and no path_on_host" in fault(call(vmm, "PUT", "/drives/v", body))


def test_patch_drive_and_interface_after_start(vmm: FakeVmm) -> None:
    call(vmm, "PUT", "/drives/d1", {"drive_id": "d1", "path_on_host": "/a", "is_root_device": False})
    call(vmm, "PUT", "/network-interfaces/n1", {"iface_id": "n1", "host_dev_name": "tap9"})
    boot(vmm)
    limiter = {"ops": {"size": 5, "refill_time": 50}}
    assert call(vmm, "PATCH", "/drives/d1", {"drive_id": "d1", "path_on_host": "/b"}).status == 204
    assert vmm.actions[-1] == a.UpdateBlockDevice("d1", Path("/b"))
    body = {"iface_id": "n1", "tx_rate_limiter": limiter}
    assert call(vmm, "PATCH", "/network-interfaces/n1", body).status == 204
    assert vmm.actions[-1] == a.UpdateNetworkDevice("n1", None, RateLimiterConfig(ops=Bucket(5, 50)))


def test_get_instance_info_and_version(vmm: FakeVmm) -> None:
    response = call(vmm, "GET", "/")
    assert response.status == 200
    assert json.loads(response.body) == {
        "id": "fake-vm",
        "state": "Not started",
        "vmm_version": "0.1.0",
        "app_name": "kvmpy",
    }
    assert json.loads(call(vmm, "GET", "/version").body) == {"firecracker_version": "0.1.0"}
    assert vmm.actions == [a.GetInstanceInfo(), a.GetInstanceInfo()]


def test_get_vm_config_has_firecrackers_layout_and_what_was_put(vmm: FakeVmm) -> None:
    call(vmm, "PUT", "/boot-source", {"kernel_image_path": "/k", "boot_args": "quiet"})
    call(vmm, "PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})
    call(vmm, "PUT", "/drives/root", {"drive_id": "root", "path_on_host": "/r", "is_root_device": True})
    call(
        vmm,
        "PUT",
        "/network-interfaces/e",
        {"iface_id": "e", "host_dev_name": "t", "guest_mac": "06:00:00:00:00:01"},
    )
    call(vmm, "PUT", "/entropy", {})
    got = json.loads(call(vmm, "GET", "/vm/config").body)
    assert set(got) >= {
        "balloon",
        "drives",
        "boot-source",
        "cpu-config",
        "logger",
        "machine-config",
        "metrics",
        "mmds-config",
        "network-interfaces",
        "vsock",
        "entropy",
    }
    assert got["boot-source"] == {"kernel_image_path": "/k", "initrd_path": None, "boot_args": "quiet"}
    assert got["machine-config"]["vcpu_count"] == 2 and got["machine-config"]["mem_size_mib"] == 64
    assert got["drives"] == [
        {
            "drive_id": "root",
            "partuuid": None,
            "is_root_device": True,
            "cache_type": "Unsafe",
            "is_read_only": False,
            "path_on_host": "/r",
            "rate_limiter": None,
            "io_engine": "Sync",
            "socket": None,
            "direct": False,
        }
    ]
    assert got["network-interfaces"][0]["guest_mac"] == "06:00:00:00:00:01"
    assert got["entropy"] == {"rate_limiter": None}
    assert got["balloon"] is None and got["vsock"] is None


# --- the monitor ------------------------------------------------------------------------------
MONITOR_CASES = [
    ("regs", {}, a.GetRegisters(0)),
    ("regs", {"vcpu": "1"}, a.GetRegisters(1)),
    ("translate", {"gva": "0xffffffff81000000", "vcpu": "0"}, a.TranslateAddress(0xFFFFFFFF81000000, 0)),
    ("translate", {"gva": "1000"}, a.TranslateAddress(0x1000)),
    ("memory", {"address": "0x1000", "length": "16", "space": "gpa"}, a.ReadMemory(0x1000, 16, True)),
    ("memory", {"address": "ffff0000", "length": "4", "vcpu": "1"}, a.ReadMemory(0xFFFF0000, 4, False, 1)),
    ("mtree", {}, a.GetMemoryTree()),
    ("irq", {}, a.GetIrqState()),
    ("vcpus", {}, a.GetVcpus()),
    ("stats", {}, a.GetStats()),
]


@pytest.mark.parametrize(("name", "query", "action"), MONITOR_CASES)
def test_monitor_routes(vmm: FakeVmm, name: str, query: dict, action: object) -> None:
    boot(vmm)
    response = call(vmm, "GET", f"/kvmpy/{name}", query=query)
    assert response.status == 200
    assert vmm.actions[-1] == action
    assert json.loads(response.body)["query"] == type(action).__name__


@pytest.mark.parametrize(
    ("name", "query", "words"),
    [
        ("regs", {"vcpu": "x"}, "is not a decimal number"),
        ("regs", {"vcpu": "-1"}, "out of range"),
        ("regs", {"cpu": "0"}, "unknown query parameter `cpu`"),
        ("translate", {}, "`gva` is required"),
        ("translate", {"gva": "0xzz"}, "not a hexadecimal address"),
        ("memory", {"address": "0", "length": "0"}, "out of range"),
        ("memory", {"address": "0", "length": "99999999"}, "out of range"),
        ("memory", {"address": "0", "length": "4", "space": "hpa"}, "neither gva nor gpa"),
        ("mtree", {"x": "1"}, "unknown query parameter"),
    ],
)
def test_monitor_bad_queries(vmm: FakeVmm, name: str, query: dict, words: str) -> None:
    boot(vmm)
    before = len(vmm.actions)
    assert words in fault(call(vmm, "GET", f"/kvmpy/{name}", query=query))
    assert len(vmm.actions) == before  # refused before it became an action


def test_monitor_before_start_is_a_phase_error(vmm: FakeVmm) -> None:
    assert fault(call(vmm, "GET", "/kvmpy/regs")) == a.NOT_ALLOWED_BEFORE_START


def test_kvmpy_stop(vmm: FakeVmm) -> None:
    boot(vmm)
    assert call(vmm, "PUT", "/kvmpy/stop").status == 204
    assert vmm.actions[-1] == a.Stop("stopped through the API")
    assert call(vmm, "PUT", "/kvmpy/stop", {"reason": "test over"}).status == 204
    assert vmm.actions[-1] == a.Stop("test over")


# --- errors, as Firecracker answers them -------------------------------------------------------
DESERIALIZE = "An error occurred when deserializing the json body of a request: "


@pytest.mark.parametrize(
    ("method", "path", "body", "words"),
    [
        ("PUT", "/boot-source", {"kernel_image_path": "/k", "bogus": 1}, "unknown field `bogus`"),
        (
            "PUT",
            "/drives/a",
            {"drive_id": "a", "is_root_device": False, "path_on_host": "/p", "x": 0},
            "unknown field `x`",
        ),
        ("PUT", "/machine-config", {"vcpu_count": 1}, "missing required field `mem_size_mib`"),
        ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 1}, "Expected `int`, got `str`"),
        ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 1}, "Expected `int` >= 1"),
        ("PUT", "/actions", {"action_type": "Reboot"}, "Invalid enum value 'Reboot'"),
        ("PATCH", "/vm", {"state": "Stopped"}, "Invalid enum value 'Stopped'"),
        ("PUT", "/drives/a", {"drive_id": "a"}, "missing required field `is_root_device`"),
        ("PUT", "/network-interfaces/a", {"iface_id": "a"}, "missing required field `host_dev_name`"),
        (
            "PUT",
            "/network-interfaces/a",
            {"iface_id": "a", "host_dev_name": "t", "guest_mac": "nope"},
            "invalid guest_mac",
        ),
        ("PUT", "/logger", {"level": "Loud"}, "Invalid LevelFilter"),
        ("PUT", "/entropy", {"rate_limiter": {"ops": {"size": -1, "refill_time": 1}}}, "Expected `int` >= 0"),
    ],
)
def test_bad_bodies(vmm: FakeVmm, method: str, path: str, body: dict, words: str) -> None:
    message = fault(call(vmm, method, path, body))
    assert message.startswith(DESERIALIZE), message
    assert words in message
    assert vmm.actions == []


@pytest.mark.parametrize("body", [b"{", b"not json", b'{"kernel_image_path": "/k"} trailing', b"\xff\xfe"])
def test_malformed_json(vmm: FakeVmm, body: bytes) -> None:
    message = fault(call(vmm, "PUT", "/boot-source", body))
    assert message.startswith(DESERIALIZE), message
    assert "JSON is malformed" in message or "Input data was truncated" in message, message


def test_path_id_must_match_body_id(vmm: FakeVmm) -> None:
    drive = {"drive_id": "b", "path_on_host": "/p", "is_root_device": False}
    assert (
        fault(call(vmm, "PUT", "/drives/a", drive))
        == "The id from the path does not match the id from the body!"
    )
    assert fault(call(vmm, "PATCH", "/drives/a", {"drive_id": "b"})) == (
        "The id from the path does not match the id from the body!"
    )
    net = {"iface_id": "y", "host_dev_name": "tap0"}
    assert fault(call(vmm, "PUT", "/network-interfaces/x", net)) == (
        "The id from the path [x] does not match the id from the body [y]!"
    )
    assert vmm.actions == []


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/drives", "The ID cannot be empty."),
        ("/drives/", "The ID cannot be empty."),
        ("/drives/a-b", "API Resource IDs can only contain alphanumeric characters and underscores."),
        (
            "/network-interfaces/eth.0",
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ),
    ],
)
def test_bad_ids(vmm: FakeVmm, path: str, message: str) -> None:
    assert fault(call(vmm, "PUT", path, {"drive_id": "a"})) == message


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("GET", "/nothing", None, "Invalid request method and/or path: GET nothing."),
        ("PUT", "/nothing", {}, "Invalid request method and/or path: PUT nothing."),
        (
            "PATCH",
            "/boot-source",
            {"kernel_image_path": "x"},
            "Invalid request method and/or path: PATCH boot-source.",
        ),
        ("PATCH", "/logger", {"level": "Error"}, "Invalid request method and/or path: PATCH logger."),
        ("GET", "/vm", None, "Invalid request method and/or path: GET vm."),
        ("PUT", "/vm", {"state": "Paused"}, "Invalid request method and/or path: PUT vm."),
        ("GET", "/actions", None, "Invalid request method and/or path: GET actions."),
        ("DELETE", "/machine-config", None, "Invalid request method and/or path: DELETE machine-config."),
        ("GET", "/kvmpy/nothing", None, "Invalid request method and/or path: GET /kvmpy/nothing."),
        (
            "POST",
            "/actions",
            {"action_type": "InstanceStart"},
            "Invalid HTTP Method: Unsupported HTTP method.",
        ),
        ("GET", "/", {"x": 1}, "GET request cannot have a body."),
        ("PUT", "/boot-source", None, "Empty PUT request."),
        ("PATCH", "/vm", None, "Empty PATCH request."),
        ("PATCH", "/machine-config", {}, "Empty PATCH request."),
    ],
)
def test_unknown_paths_and_methods(vmm: FakeVmm, method: str, path: str, body: object, message: str) -> None:
    assert fault(call(vmm, method, path, body)) == message
    assert vmm.actions == []


@pytest.mark.parametrize(
    ("method", "path", "body", "words"),
    [
        (
            "PUT",
            "/snapshot/load",
            {"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}},
            "Uffd",
        ),
        (
            "PUT",
            "/snapshot/load",
            {"snapshot_path": "s", "mem_file_path": "m", "huge_pages": "2M"},
            "huge_pages",
        ),
        ("PUT", "/vsock", {"guest_cid": 3, "uds_path": "/v"}, "vsock"),
        ("PUT", "/mmds", {"latest": {}}, "MMDS"),
        ("PUT", "/mmds/config", {"network_interfaces": ["eth0"]}, "MMDS"),
        ("GET", "/mmds", None, "MMDS"),
        ("PUT", "/cpu-config", {"cpuid_modifiers": []}, "CPU templates"),
        ("PUT", "/pmem/p", {"id": "p", "path_on_host": "/p"}, "virtio-pmem"),
        ("DELETE", "/drives/a", None, "hot-unplugging"),
        (
            "PUT",
            "/drives/a",
            {"drive_id": "a", "is_root_device": False, "path_on_host": "/p", "io_engine": "Async"},
            'io_engine "Async"',
        ),
        (
            "PUT",
            "/machine-config",
            {"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "Transparent"},
            "Transparent",
        ),
        (
            "PUT",
            "/machine-config",
            {"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "T2"},
            "cpu_template",
        ),
        ("PUT", "/network-interfaces/a", {"iface_id": "a", "host_dev_name": "t", "mtu": 1400}, "mtu"),
        ("PUT", "/serial", {"rate_limiter": {"size": 1, "refill_time": 1}}, "rate_limiter"),
        ("PUT", "/metrics", {"metrics_path": "/m", "emit_id": True}, "emit_id"),
    ],
)
def test_unsupported_operations_say_so_and_why(
    vmm: FakeVmm, method: str, path: str, body: object, words: str
) -> None:
    message = fault(call(vmm, method, path, body))
    assert message.startswith("The requested operation is not supported: "), message
    assert words in message
    assert vmm.actions == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PATCH", "/drives/a", {"drive_id": "a", "path_on_host": "/b"}),
        ("PATCH", "/network-interfaces/a", {"iface_id": "a"}),
        ("PATCH", "/vm", {"state": "Paused"}),
        ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
        ("PUT", "/actions", {"action_type": "FlushMetrics"}),
    ],
)
def test_runtime_calls_before_start(vmm: FakeVmm, method: str, path: str, body: object) -> None:
    assert fault(call(vmm, method, path, body)) == a.NOT_ALLOWED_BEFORE_START


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/boot-source", {"kernel_image_path": "/k2"}),
        ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128}),
        ("PATCH", "/machine-config", {"vcpu_count": 4}),
        ("PUT", "/drives/x", {"drive_id": "x", "path_on_host": "/p", "is_root_device": False}),
        ("PUT", "/network-interfaces/x", {"iface_id": "x", "host_dev_name": "tap0"}),
        ("PUT", "/entropy", {}),
        ("PUT", "/logger", {"level": "Info"}),
        ("PUT", "/actions", {"action_type": "InstanceStart"}),
    ],
)
def test_configuration_after_start(vmm: FakeVmm, method: str, path: str, body: object) -> None:
    boot(vmm)
    assert fault(call(vmm, method, path, body)) == a.NOT_ALLOWED_AFTER_START


def test_action_error_is_400_with_its_message(vmm: FakeVmm) -> None:
    message = fault(call(vmm, "PUT", "/actions", {"action_type": "InstanceStart"}))
    assert message == "Start microvm error: no kernel: configure a boot source first"


def test_a_failing_submit_is_500_and_the_router_goes_on(vmm: FakeVmm) -> None:
    vmm.fail_next = RuntimeError("the disk caught fire")
    response = call(vmm, "GET", "/")
    assert response.status == 500
    assert "the disk caught fire" in json.loads(response.body)["fault_message"]
    assert call(vmm, "GET", "/").status == 200


def test_a_submit_that_returns_the_wrong_type_is_500() -> None:
    router = Router(lambda action: "not instance info")
    response = router.handle(Request("GET", "/"))
    assert response.status == 500
    assert "not InstanceInfo" in json.loads(response.body)["fault_message"]


# --- snapshots -----------------------------------------------------------------------------------
def test_snapshot_create_from_a_paused_vm(vmm: FakeVmm) -> None:
    boot(vmm)
    body = {"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}
    assert fault(call(vmm, "PUT", "/snapshot/create", body)).startswith("the VM must be paused")
    call(vmm, "PATCH", "/vm", {"state": "Paused"})
    assert call(vmm, "PUT", "/snapshot/create", {**body, "snapshot_type": "Diff"}).status == 204
    assert vmm.actions[-1] == a.CreateSnapshot(Path("/tmp/s"), Path("/tmp/m"), "Diff")


@pytest.mark.parametrize(
    ("body", "action"),
    [
        ({"snapshot_path": "/s", "mem_file_path": "/m"}, a.LoadSnapshot(Path("/s"), Path("/m"))),
        (
            {
                "snapshot_path": "/s",
                "mem_backend": {"backend_type": "File", "backend_path": "/m"},
                "resume_vm": True,
                "track_dirty_pages": True,
                "huge_pages": "Snapshot",
            },
            a.LoadSnapshot(Path("/s"), Path("/m"), resume_vm=True, track_dirty_pages=True),
        ),
        (
            {"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": True},
            a.LoadSnapshot(Path("/s"), Path("/m"), track_dirty_pages=True),
        ),
        (
            {
                "snapshot_path": "/s",
                "mem_file_path": "/m",
                "network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap1"}],
            },
            a.LoadSnapshot(Path("/s"), Path("/m"), network_overrides=(("eth0", "tap1"),)),
        ),
    ],
)
def test_snapshot_load_into_a_fresh_vmm(vmm: FakeVmm, body: dict, action: a.LoadSnapshot) -> None:
    assert call(vmm, "PUT", "/snapshot/load", body).status == 204
    assert vmm.actions == [action]
    state = json.loads(call(vmm, "GET", "/").body)["state"]
    assert state == ("Running" if action.resume_vm else "Paused")


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/snapshot", {"snapshot_path": "s"}, "Missing snapshot operation type."),
        ("/snapshot/take", {"snapshot_path": "s"}, "Invalid request method and/or path: PUT /snapshot/take."),
        (
            "/snapshot/load",
            {"snapshot_path": "s"},
            DESERIALIZE + "missing field: either `mem_backend` or `mem_file_path` is required.",
        ),
        (
            "/snapshot/load",
            {
                "snapshot_path": "s",
                "mem_file_path": "m",
                "mem_backend": {"backend_type": "File", "backend_path": "m"},
            },
            DESERIALIZE + "too many fields: either `mem_backend` or `mem_file_path` exclusively is required.",
        ),
        (
            "/snapshot/create",
            {"snapshot_path": "s", "mem_file_path": "m", "snapshot_type": "Half"},
            DESERIALIZE + "Invalid enum value 'Half' - at `$.snapshot_type`.",
        ),
        (
            "/snapshot/create",
            {"snapshot_path": "s"},
            DESERIALIZE + "Object missing required field `mem_file_path`.",
        ),
    ],
)
def test_snapshot_errors_as_firecracker_words_them(vmm: FakeVmm, path: str, body: dict, message: str) -> None:
    assert fault(call(vmm, "PUT", path, body)) == message
    assert vmm.actions == []


def test_snapshot_phases(vmm: FakeVmm) -> None:
    body = {"snapshot_path": "/s", "mem_file_path": "/m"}
    assert fault(call(vmm, "PUT", "/snapshot/create", body)) == a.NOT_ALLOWED_BEFORE_START
    call(vmm, "PUT", "/boot-source", {"kernel_image_path": "/k"})
    assert fault(call(vmm, "PUT", "/snapshot/load", body)) == (
        "Loading a microVM snapshot not allowed after configuring boot-specific resources."
    )
    call(vmm, "PUT", "/actions", {"action_type": "InstanceStart"})
    assert fault(call(vmm, "PUT", "/snapshot/load", body)) == a.NOT_ALLOWED_AFTER_START


# --- the balloon ---------------------------------------------------------------------------------
def test_the_balloon_is_configured_before_boot_and_steered_after(vmm: FakeVmm) -> None:
    from kvmpy.vmm.config import BalloonConfig

    assert "No balloon device configured" in fault(call(vmm, "GET", "/balloon"))
    body = {"amount_mib": 64, "deflate_on_oom": True, "stats_polling_interval_s": 5}
    assert call(vmm, "PUT", "/balloon", body).status == 204
    assert vmm.actions[-1] == a.SetBalloon(BalloonConfig(64, deflate_on_oom=True, stats_polling_interval_s=5))
    got = json.loads(call(vmm, "GET", "/balloon").body)
    assert got == {**body, "free_page_reporting": False}
    assert json.loads(call(vmm, "GET", "/vm/config").body)["balloon"] == got
    assert "not supported before starting" in fault(call(vmm, "PATCH", "/balloon", {"amount_mib": 32}))
    boot(vmm)
    assert call(vmm, "PATCH", "/balloon", {"amount_mib": 32}).status == 204
    assert vmm.actions[-1] == a.UpdateBalloon(32)
    assert json.loads(call(vmm, "GET", "/balloon").body)["amount_mib"] == 32
    assert call(vmm, "PATCH", "/balloon/statistics", {"stats_polling_interval_s": 2}).status == 204
    assert vmm.actions[-1] == a.UpdateBalloonStatistics(2)
    assert json.loads(call(vmm, "GET", "/balloon/statistics").body)["target_pages"] == 32 * 256
    assert "not supported after starting" in fault(call(vmm, "PUT", "/balloon", body))


@pytest.mark.parametrize(
    ("method", "path", "body", "words"),
    [
        ("PUT", "/balloon", {"amount_mib": 1}, "deflate_on_oom"),
        ("PUT", "/balloon", {"amount_mib": -1, "deflate_on_oom": False}, ">= 0"),
        ("PUT", "/balloon", {"amount_mib": 1, "deflate_on_oom": False, "hints": 1}, "unknown field"),
        ("PATCH", "/balloon", {"amount_mib": "x"}, "Expected `int`"),
        ("PATCH", "/balloon/stats", {"stats_polling_interval_s": 1}, "Invalid request method"),
    ],
)
def test_bad_balloon_requests_are_400s(
    vmm: FakeVmm, method: str, path: str, body: object, words: str
) -> None:
    assert words in fault(call(vmm, method, path, body))


# --- VFIO (kvmpy's PUT /vfio/{id}) ---------------------------------------------------------------
def vfio(device_id: str, bdf: str) -> dict[str, str]:
    return {"vfio_id": device_id, "host_bdf": bdf}


@pytest.mark.parametrize(
    ("body", "bdf"),
    [(vfio("gpu", "0000:00:04.0"), "0000:00:04.0"), (vfio("gpu", "3A:1f.7"), "0000:3a:1f.7")],
)
def test_put_vfio_makes_the_action_with_the_canonical_address(vmm: FakeVmm, body: dict, bdf: str) -> None:
    assert call(vmm, "PUT", "/vfio/gpu", body) == Response(204)
    assert vmm.actions == [a.InsertVfioDevice(VfioConfig(bdf, id="gpu"))]


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/vfio/a", vfio("b", "00:04.0"), "The id from the path does not match the id from the body!"),
        ("/vfio", vfio("a", "00:04.0"), "The ID cannot be empty."),
        (
            "/vfio/a-b",
            vfio("a-b", "00:04.0"),
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ),
        ("/vfio/a/b", vfio("a", "00:04.0"), "Invalid request method and/or path: PUT vfio."),
        (
            "/vfio/a",
            vfio("a", "04.0"),
            f"{DESERIALIZE}host_bdf='04.0': not a PCI address; give it as DDDD:BB:DD.F, e.g. 0000:00:04.0.",
        ),
        (
            "/vfio/a",
            vfio("a", "0000:00:04.8"),
            f"{DESERIALIZE}host_bdf='0000:00:04.8': not a PCI address; give it as DDDD:BB:DD.F,"
            " e.g. 0000:00:04.0.",
        ),
        (
            "/vfio/a",
            {**vfio("a", "00:04.0"), "iommu": 1},
            f"{DESERIALIZE}Object contains unknown field `iommu`.",
        ),
        ("/vfio/a", {"vfio_id": "a"}, f"{DESERIALIZE}Object missing required field `host_bdf`."),
        (
            "/vfio/a",
            {"vfio_id": "a", "host_bdf": 4},
            f"{DESERIALIZE}Expected `str`, got `int` - at `$.host_bdf`.",
        ),
    ],
)
def test_bad_vfio_requests_are_400s_that_reach_no_vmm(
    vmm: FakeVmm, path: str, body: dict, message: str
) -> None:
    assert fault(call(vmm, "PUT", path, body)) == message
    assert vmm.actions == []


def test_vfio_after_start_is_refused_as_drives_are(vmm: FakeVmm) -> None:
    boot(vmm)
    assert fault(call(vmm, "PUT", "/vfio/gpu", vfio("gpu", "00:04.0"))) == a.NOT_ALLOWED_AFTER_START
    drive = {"drive_id": "x", "path_on_host": "/p", "is_root_device": False}
    assert fault(call(vmm, "PUT", "/drives/x", drive)) == a.NOT_ALLOWED_AFTER_START
    assert "hot-unplugging" in fault(call(vmm, "DELETE", "/vfio/gpu"))


def test_get_vm_config_lists_the_vfio_devices(vmm: FakeVmm) -> None:
    assert json.loads(call(vmm, "GET", "/vm/config").body)["vfio"] == []
    call(vmm, "PUT", "/vfio/gpu", vfio("gpu", "01:00.0"))
    call(vmm, "PUT", "/vfio/nic", vfio("nic", "0000:02:00.1"))
    got = json.loads(call(vmm, "GET", "/vm/config").body)
    assert got["vfio"] == [vfio("gpu", "0000:01:00.0"), vfio("nic", "0000:02:00.1")]


@pytest.fixture
def real_vmm(tmp_path: Path) -> Iterator[tuple[Vmm, Path]]:
    """The real Vmm serving on a thread of its own, as behind the API socket; nothing boots here
    (every start in these tests is refused before a machine is built), so no /dev/kvm is needed."""
    kernel = tmp_path / "kernel"
    kernel.write_bytes(b"\0" * 16)
    built: list[Vmm] = []
    ready = threading.Event()

    def serve() -> None:
        built.append(Vmm())  # built on this thread, so it is the VMM thread from the start
        ready.set()
        built[0].run()

    thread = threading.Thread(target=serve)
    thread.start()
    assert ready.wait(10)
    try:
        yield built[0], kernel
    finally:
        built[0].submit(a.Stop("test over"))
        thread.join(10)


def test_put_vfio_again_replaces_it_and_one_address_takes_one_id(real_vmm: tuple[Vmm, Path]) -> None:
    vmm, _ = real_vmm
    router = Router(vmm.submit)
    put = router.handle
    assert put(Request("PUT", "/vfio/gpu", {}, json.dumps(vfio("gpu", "00:04.0")).encode())).status == 204
    assert put(Request("PUT", "/vfio/gpu", {}, json.dumps(vfio("gpu", "00:05.0")).encode())).status == 204
    assert put(Request("PUT", "/vfio/nic", {}, json.dumps(vfio("nic", "00:04.0")).encode())).status == 204
    same = put(Request("PUT", "/vfio/disk", {}, json.dumps(vfio("disk", "0000:00:05.0")).encode()))
    assert fault(same) == "The host PCI device 0000:00:05.0 is already assigned as gpu."
    assert vmm.config.vfio_devices == (VfioConfig("0000:00:05.0", "gpu"), VfioConfig("0000:00:04.0", "nic"))


@pytest.mark.parametrize(
    ("path", "body", "words"),
    [
        (
            "/balloon",
            {"amount_mib": 4, "deflate_on_oom": False},
            "a balloon and an assigned device (--device vfio=, PUT /vfio) do not go together",
        ),
        (
            "/machine-config",
            {"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": True},
            "track_dirty_pages",
        ),
    ],
)
def test_vmconfig_checks_on_vfio_answer_400_at_instance_start(
    real_vmm: tuple[Vmm, Path], path: str, body: dict, words: str
) -> None:
    vmm, kernel = real_vmm
    router = Router(vmm.submit)
    for method_path, sent in (
        ("/boot-source", {"kernel_image_path": str(kernel)}),
        ("/vfio/gpu", vfio("gpu", "00:04.0")),
        (path, body),
    ):
        assert router.handle(Request("PUT", method_path, {}, json.dumps(sent).encode())).status == 204
    start = router.handle(Request("PUT", "/actions", {}, b'{"action_type": "InstanceStart"}'))
    assert start.status == 400 and words in fault(start)
    assert vmm.state is a.VmState.NOT_STARTED and vmm.machine is None


def test_a_snapshot_cannot_load_over_a_configured_vfio_device(vmm: FakeVmm) -> None:
    call(vmm, "PUT", "/vfio/gpu", vfio("gpu", "00:04.0"))
    body = {"snapshot_path": "/s", "mem_file_path": "/m"}
    assert "not allowed after configuring boot-specific resources" in fault(
        call(vmm, "PUT", "/snapshot/load", body)
    )
