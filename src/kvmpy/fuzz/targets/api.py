"""The API's requests, without a socket: the router, the body parsers, the monitor's queries,
and ``--config-file``'s full configuration, against the fake VMM's real phase tables.

An input is a mode byte, then for mode 0 (the router) up to eight requests::

    method  u8    GET, PUT, PATCH, DELETE or POST
    path    u8    one of PATHS, or 255: a raw path (u8 length, bytes)
    id      u8 length, bytes: appended as "/<id>" when not empty
    query   u8 count (at most 4), then key and value (u8 length, bytes each)
    body    u16 length (0xFFFF: no body), bytes

and for mode 1 the rest is a configuration file.
"""

from __future__ import annotations

import dataclasses
from pathlib import PurePath

import msgspec

from kvmpy.api import schemas
from kvmpy.api.config_file import config_actions
from kvmpy.api.messages import Request
from kvmpy.api.router import Router
from kvmpy.errors import ConfigError
from kvmpy.fuzz.harness import KnownIssue, Reader, Writer, check
from kvmpy.testing.fake_vmm import FakeVmm

METHODS = ("GET", "PUT", "PATCH", "DELETE", "POST")
PATHS = ("/", "/version", "/machine-config", "/vm/config", "/actions", "/boot-source", "/drives",
         "/network-interfaces", "/entropy", "/serial", "/logger", "/metrics", "/vm", "/kvmpy/stop",
         "/kvmpy/regs", "/kvmpy/translate", "/kvmpy/memory", "/kvmpy/mtree", "/kvmpy/irq",
         "/kvmpy/vcpus", "/kvmpy/stats", "/balloon", "/snapshot/create", "/mmds", "/cpu-config",
         "/vfio")  # fmt: skip
NO_BODY = 0xFFFF
MAX_REQUESTS = 8


def _text(reader: Reader) -> str:
    return reader.take(reader.u8()).decode("utf-8", errors="replace")


def _check_paths(value: object) -> None:
    """Every path an action carries is a name the VMM can hand to open(): no NUL byte in it."""
    if isinstance(value, PurePath):
        check("\0" not in str(value), f"an action carries the path {str(value)!r}, which open() refuses")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for item in dataclasses.fields(value):
            _check_paths(getattr(value, item.name))
    elif isinstance(value, tuple | list):
        for item in value:
            _check_paths(item)


class ApiTarget:
    name = "api"
    max_len = 4096
    invariants = (
        "the router answers every request and never raises; no request is a 500 (an exception "
        "escaping a parser or the VMM's submit)",
        "an error answer is 4xx with a JSON body holding a string fault_message; 204 has no body; "
        "200 has a JSON body",
        "a configuration file gives a list of actions or a ConfigError, nothing else",
        "every file path an action carries (kernel, initrd, disk, serial, log, metrics) is one "
        "open() takes: no NUL byte",
        "every action the configuration file gives is accepted or refused by the fake VMM as an "
        "ActionError, never with another exception",
    )
    known: tuple[KnownIssue, ...] = ()

    def run(self, data: bytes) -> None:
        reader = Reader(data)
        if reader.u8() & 1:
            self._config_file(reader.rest())
            return
        vmm = FakeVmm()
        router = Router(vmm.submit)
        for _ in range(MAX_REQUESTS):
            if not reader.remaining:
                break
            method = METHODS[reader.u8() % len(METHODS)]
            choice = reader.u8()
            path = _text(reader) if choice == 255 else PATHS[choice % len(PATHS)]
            resource_id = _text(reader)
            if resource_id:
                path = f"{path}/{resource_id}"
            query = {_text(reader): _text(reader) for _ in range(reader.u8() % 5)}
            length = reader.u16()
            body = None if length == NO_BODY else reader.take(length)
            seen = len(vmm.actions)
            response = router.handle(Request(method, path, query, body))
            self._check_response(response.status, response.body, f"{method} {path}")
            for action in vmm.actions[seen:]:
                _check_paths(action)

    @staticmethod
    def _check_response(status: int, body: bytes, what: str) -> None:
        check(status != 500, f"{what}: a 500: {body[:300]!r}")
        if status == 204:
            check(body == b"", f"{what}: 204 with a body")
            return
        try:
            decoded = msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise AssertionError(f"{what}: the body is not JSON: {body[:200]!r}") from None
        if status >= 400:
            check(400 <= status < 500, f"{what}: status {status}")
            check(isinstance(decoded, dict) and isinstance(decoded.get("fault_message"), str),
                  f"{what}: an error without a fault_message")  # fmt: skip
        else:
            check(status == 200, f"{what}: status {status}")

    @staticmethod
    def _config_file(data: bytes) -> None:
        try:
            actions = config_actions(data, "fuzz.json")
        except ConfigError:
            return
        check(isinstance(actions, list), "config_actions returned no list")
        for action in actions:
            _check_paths(action)
        from kvmpy.vmm.actions import ActionError

        vmm = FakeVmm()
        for action in actions:
            try:
                vmm.submit(action)
            except ActionError:
                pass

    def seeds(self) -> list[bytes]:
        def request(method: str, path: str, body: object = None, resource_id: str = "",
                    query: dict[str, str] | None = None) -> bytes:  # fmt: skip
            out = Writer().u8(METHODS.index(method)).u8(PATHS.index(path))
            out.u8(len(resource_id)).raw(resource_id.encode())
            out.u8(len(query or {}))
            for key, value in (query or {}).items():
                out.u8(len(key)).raw(key.encode()).u8(len(value)).raw(value.encode())
            raw = None if body is None else msgspec.json.encode(body)
            out.u16(NO_BODY if raw is None else len(raw)).raw(raw or b"")
            return out.bytes()

        bucket = schemas.TokenBucket(size=1 << 20, refill_time=100, one_time_burst=1 << 22)
        limiter = schemas.RateLimiter(bandwidth=bucket, ops=schemas.TokenBucket(size=100, refill_time=1000))
        boot = schemas.BootSource(
            kernel_image_path="/vmlinux", initrd_path="/initrd", boot_args="console=ttyS0"
        )
        machine = schemas.MachineConfiguration(vcpu_count=2, mem_size_mib=256, huge_pages="2M")
        drive = schemas.Drive(drive_id="root", is_root_device=True, path_on_host="/rootfs.ext4",
                              is_read_only=False, rate_limiter=limiter)  # fmt: skip
        net = schemas.NetworkInterface(iface_id="eth0", host_dev_name="tap0", guest_mac="06:00:AC:10:00:02",
                                       rx_rate_limiter=limiter)  # fmt: skip
        vfio = schemas.VfioDevice(vfio_id="gpu", host_bdf="01:00.0")
        configure = (
            request("PUT", "/boot-source", boot) + request("PUT", "/machine-config", machine)
            + request("PUT", "/drives", drive, "root") + request("PUT", "/network-interfaces", net, "eth0")
            + request("PUT", "/entropy", schemas.EntropyDevice())
            + request("PUT", "/serial", schemas.SerialDevice())
            + request("PUT", "/vfio", vfio, "gpu")
        )  # fmt: skip
        start = request("PUT", "/actions", schemas.InstanceActionInfo(action_type="InstanceStart"))
        runtime = (
            request("PATCH", "/vm", schemas.Vm(state="Paused"))
            + request("GET", "/kvmpy/regs", query={"cpu": "0"})
            + request("GET", "/kvmpy/translate", query={"cpu": "0", "gva": "0xffffffff81000000"})
            + request("GET", "/kvmpy/memory", query={"gpa": "0x1000", "size": "64"})
            + request("PATCH", "/drives", schemas.PartialDrive(drive_id="root", path_on_host="/o"), "root")
            + request("PATCH", "/vm", schemas.Vm(state="Resumed")) + request("GET", "/vm/config")
        )  # fmt: skip
        logging = request("PUT", "/logger", schemas.Logger(log_path="/tmp/log", level="Info"))
        logging += request("PUT", "/metrics", schemas.Metrics(metrics_path="/tmp/metrics"))
        full = schemas.FullVmConfiguration(boot_source=boot, drives=[drive], machine_config=machine,
                                           network_interfaces=[net], vfio=[vfio])  # fmt: skip
        return [
            b"\0" + request("GET", "/") + request("GET", "/version") + request("GET", "/machine-config"),
            b"\0" + configure + start,
            b"\0" + configure[: len(configure) // 2] + start + runtime,
            b"\0" + logging + request("PUT", "/kvmpy/stop", {"reason": "fuzz"}),
            b"\1" + msgspec.json.encode(full),
        ]


FACTORIES = {"api": ApiTarget}

__all__ = ["FACTORIES", "ApiTarget"]
