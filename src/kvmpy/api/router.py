"""Method and path to an action, ``submit``, and a response (Firecracker's ``ParsedRequest``).

The order of the checks is Firecracker's, so the same mistakes get the same
answers: a GET with a body, a PUT or PATCH without one, an unknown path or
method, an id that is empty or has other characters than ``[A-Za-z0-9_]``,
then the body's JSON and the action. Refused actions (:class:`ActionError`,
the phase tables among them) are 400; anything else ``submit`` raises is a 500
that is logged, and the server goes on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from kvmpy.api import monitor, render
from kvmpy.api.errors import UNSUPPORTED, RequestError, invalid_path_method, not_supported
from kvmpy.api.messages import NO_CONTENT, Request, Response, fault, json_response
from kvmpy.vmm.actions import (
    Action,
    ActionError,
    GetBalloon,
    GetBalloonStatistics,
    GetInstanceInfo,
    GetVmConfig,
    InstanceInfo,
    UpdateBalloon,
    UpdateBalloonStatistics,
)
from kvmpy.vmm.config import BalloonConfig, VmConfig

if TYPE_CHECKING:
    pass

Submit = Callable[[Action], object]
Renderer = Callable[[object], Response]
Result = TypeVar("Result")

#: Which methods Firecracker routes for each of them (the others are an invalid path).
_UNSUPPORTED_METHODS = {
    "GET": {"mmds", "hotplug"},
    "PUT": {"cpu-config", "pmem", "mmds", "vsock", "hotplug"},
    "PATCH": {"mmds", "pmem", "hotplug"},
    "DELETE": {"drives", "network-interfaces", "pmem", "vfio"},
}
_HOT_UNPLUG = "hot-unplugging devices: kvmpy's PCI bus has no hotplug."


def _no_content(_result: object) -> Response:
    return NO_CONTENT


def _checked(kind: type[Result], result: object) -> Result:
    """``result`` if it is what the action promises; a TypeError (a 500) if the VMM broke its word."""
    if not isinstance(result, kind):
        raise TypeError(f"submit returned {type(result).__name__}, not {kind.__name__}")
    return result


def _instance_info(result: object) -> Response:
    return json_response(render.instance_info(_checked(InstanceInfo, result)))


def _version(result: object) -> Response:
    return json_response(render.version(_checked(InstanceInfo, result)))


def _machine_config(result: object) -> Response:
    return json_response(render.machine_config(_checked(VmConfig, result)))


def _full_config(result: object) -> Response:
    return json_response(render.full_config(_checked(VmConfig, result)))


def _balloon(result: object) -> Response:
    return json_response(render.balloon(_checked(BalloonConfig, result)))


def _monitor_result(result: object) -> Response:
    return json_response(_checked(dict, result))


Routed = tuple[Action, Renderer]


class Router:
    """Turns requests into actions for ``submit`` and its results into responses."""

    def __init__(self, submit: Submit) -> None:
        self._submit = submit

    def handle(self, request: Request) -> Response:
        """Answer ``request``; never raises."""
        try:
            action, renderer = self.route(request)
        except RequestError as error:
            return fault(error.message, error.status)
        return self._run(action, renderer)

    def _run(self, action: Action, renderer: Renderer) -> Response:
        try:
            return renderer(self._submit(action))
        except ActionError as error:
            return fault(str(error))
        except Exception as error:  # the VMM's failure must not end the API thread
            import logging  # only on this path: GET / must answer soon after process start

            logging.getLogger("kvmpy.api").exception("API request %s failed", type(action).__name__)
            return fault(f"Internal error while handling {type(action).__name__}: {error}", 500)

    def route(self, request: Request) -> Routed:
        """The action for ``request`` and how to render its result; RequestError if there is none."""
        tokens = request.path.strip("/").split("/")
        resource, rest = tokens[0], tokens[1:]
        if resource == "kvmpy":
            return self._kvmpy(request, rest)
        method, body = request.method, request.body
        if method == "GET":
            if body is not None:
                raise RequestError("GET request cannot have a body.")
            return self._get(resource, rest)
        if method in ("PUT", "PATCH"):
            if body is None:
                raise RequestError(f"Empty {method} request.")
            handler = self._put if method == "PUT" else self._patch
            return handler(resource, rest, body)
        if method == "DELETE":
            if body is not None:
                raise RequestError("Empty Delete request.")
            if resource in _UNSUPPORTED_METHODS["DELETE"]:
                raise not_supported(_HOT_UNPLUG)
            raise invalid_path_method(method, resource)
        raise RequestError("Invalid HTTP Method: Unsupported HTTP method.")

    @staticmethod
    def _unsupported(method: str, resource: str) -> None:
        if resource in _UNSUPPORTED_METHODS[method]:
            raise not_supported(UNSUPPORTED[resource])

    def _get(self, resource: str, rest: list[str]) -> Routed:
        self._unsupported("GET", resource)
        if not rest:
            if resource == "":
                return GetInstanceInfo(), _instance_info
            if resource == "version":
                return GetInstanceInfo(), _version
            if resource == "machine-config":
                return GetVmConfig(), _machine_config
        if resource == "vm" and rest == ["config"]:
            return GetVmConfig(), _full_config
        if resource == "balloon" and rest in ([], ["statistics"]):
            if rest:
                return GetBalloonStatistics(), _monitor_result
            return GetBalloon(), _balloon
        raise invalid_path_method("GET", resource)

    def _put(self, resource: str, rest: list[str], body: bytes) -> Routed:
        from kvmpy.api import parse, schemas  # msgspec loads with the first body, not before GET /

        self._unsupported("PUT", resource)
        if resource in ("drives", "network-interfaces", "vfio"):
            return self._put_device(resource, rest, body), _no_content
        if resource == "snapshot":
            return self._put_snapshot(rest, body), _no_content
        if rest:
            raise invalid_path_method("PUT", resource)
        action: Action
        if resource == "actions":
            action = parse.instance_action(parse.decode(body, schemas.InstanceActionInfo))
        elif resource == "boot-source":
            action = parse.boot_source(parse.decode(body, schemas.BootSource))
        elif resource == "machine-config":
            action = parse.machine(parse.decode(body, schemas.MachineConfiguration))
        elif resource == "entropy":
            action = parse.entropy(parse.decode(body, schemas.EntropyDevice))
        elif resource == "balloon":
            action = parse.balloon(parse.decode(body, schemas.Balloon))
        elif resource == "serial":
            action = parse.serial(parse.decode(body, schemas.SerialDevice))
        elif resource == "logger":
            action = parse.logger(parse.decode(body, schemas.Logger))
        elif resource == "metrics":
            action = parse.metrics(parse.decode(body, schemas.Metrics))
        else:
            raise invalid_path_method("PUT", resource)
        return action, _no_content

    @staticmethod
    def _device_id(method: str, resource: str, rest: list[str]) -> str:
        from kvmpy.api import parse

        if len(rest) > 1:
            raise invalid_path_method(method, resource)
        return parse.checked_id(rest[0] if rest else None)

    def _put_device(self, resource: str, rest: list[str], body: bytes) -> Action:
        from kvmpy.api import parse, schemas  # msgspec loads with the first body, not before GET /

        path_id = self._device_id("PUT", resource, rest)
        if resource == "drives":
            return parse.drive(parse.decode(body, schemas.Drive), path_id)
        if resource == "vfio":
            return parse.vfio_device(parse.decode(body, schemas.VfioDevice), path_id)
        return parse.network_interface(parse.decode(body, schemas.NetworkInterface), path_id)

    def _put_snapshot(self, rest: list[str], body: bytes) -> Action:
        from kvmpy.api import parse, schemas  # msgspec loads with the first body, not before GET /

        if not rest:
            raise RequestError("Missing snapshot operation type.")
        if rest == ["create"]:
            return parse.snapshot_create(parse.decode(body, schemas.SnapshotCreateParams))
        if rest == ["load"]:
            return parse.snapshot_load(parse.decode(body, schemas.SnapshotLoadParams))
        raise invalid_path_method("PUT", "/snapshot/" + "/".join(rest))

    def _patch(self, resource: str, rest: list[str], body: bytes) -> Routed:
        from kvmpy.api import parse, schemas  # msgspec loads with the first body, not before GET /

        self._unsupported("PATCH", resource)
        action: Action
        if resource == "drives":
            path_id = self._device_id("PATCH", resource, rest)
            action = parse.drive_update(parse.decode(body, schemas.PartialDrive), path_id)
        elif resource == "network-interfaces":
            path_id = self._device_id("PATCH", resource, rest)
            update = parse.decode(body, schemas.PartialNetworkInterface)
            action = parse.network_interface_update(update, path_id)
        elif resource == "balloon" and rest == ["statistics"]:
            stats = parse.decode(body, schemas.BalloonStatsUpdate)
            action = UpdateBalloonStatistics(stats.stats_polling_interval_s)
        elif rest:
            raise invalid_path_method("PATCH", resource)
        elif resource == "balloon":
            action = UpdateBalloon(parse.decode(body, schemas.BalloonUpdate).amount_mib)
        elif resource == "machine-config":
            action = parse.machine_update(parse.decode(body, schemas.MachineConfigurationUpdate))
        elif resource == "vm":
            action = parse.vm_state(parse.decode(body, schemas.Vm))
        else:
            raise invalid_path_method("PATCH", resource)
        return action, _no_content

    def _kvmpy(self, request: Request, rest: list[str]) -> Routed:
        """kvmpy's own routes: the monitor's GETs, PUT /kvmpy/stop and PUT /kvmpy/migrate."""
        from kvmpy.api import parse, schemas

        name = rest[0] if len(rest) == 1 else None
        if request.method == "PUT" and name == "stop":
            body = parse.decode(request.body or b"{}", schemas.KvmpyStop)
            return parse.stop(body), _no_content
        if request.method == "PUT" and name == "migrate":
            return parse.migrate(parse.decode(request.body or b"", schemas.KvmpyMigrate)), _monitor_result
        if request.method == "GET" and name in monitor.ROUTES:
            if request.body is not None:
                raise RequestError("GET request cannot have a body.")
            return monitor.ROUTES[name](request.query), _monitor_result
        raise invalid_path_method(request.method, request.path)


__all__ = ["Request", "Router", "Submit"]
