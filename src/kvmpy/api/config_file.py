"""``--config-file``: Firecracker's full-config JSON becomes the list of actions the API would get.

The same Structs and parsers as the HTTP API validate it, so a file is refused
for exactly what a request would be refused for; the error is one line naming
the file, where in it, and what is wrong (a :class:`~kvmpy.errors.ConfigError`).

The actions come in Firecracker's order (logger, metrics, machine-config,
boot-source, drives, network-interfaces, entropy, balloon), with kvmpy's vfio
devices after the interfaces, and then kvmpy's serial.
StartInstance is not among them: the caller submits it after these, as
Firecracker boots a VM configured from a file.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import msgspec

from kvmpy.api import parse, schemas
from kvmpy.api.errors import NOT_SUPPORTED_PREFIX, UNSUPPORTED, RequestError
from kvmpy.errors import ConfigError
from kvmpy.vmm.actions import Action

Item = TypeVar("Item")

#: Keys of resources kvmpy has not got, and the UNSUPPORTED reason each refers to.
_UNSUPPORTED_KEYS = {
    "vsock": "vsock",
    "mmds_config": "mmds",
    "cpu_config": "cpu-config",
    "pmem": "pmem",
    "memory_hotplug": "hotplug",
}


def load_config_file(path: str | os.PathLike[str]) -> list[Action]:
    """The actions that configure a VM as the Firecracker config file at ``path`` says."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise ConfigError(f"config file {name} cannot be read: {error.strerror}") from None
    return config_actions(data, name)


def config_actions(data: bytes, name: str = "<config>") -> list[Action]:
    """The actions for the JSON document ``data``; ``name`` is used in error messages."""
    config = _decode(data, name)
    _refuse_unsupported(config, name)
    found: list[Action] = []
    _add(found, name, "logger", config.logger, parse.logger)
    _add(found, name, "metrics", config.metrics, parse.metrics)
    _add(found, name, "machine-config", config.machine_config, parse.machine)
    _add(found, name, "boot-source", config.boot_source, parse.boot_source)
    for index, drive in enumerate(config.drives):
        _add(found, name, f"drives[{index}]", drive, parse.drive)
    for index, net in enumerate(config.network_interfaces):
        _add(found, name, f"network-interfaces[{index}]", net, parse.network_interface)
    for index, device in enumerate(config.vfio):
        _add(found, name, f"vfio[{index}]", device, parse.vfio_device)
    _add(found, name, "entropy", config.entropy, parse.entropy)
    _add(found, name, "balloon", config.balloon, parse.balloon)
    _add(found, name, "serial", config.serial, parse.serial)
    return found


def _decode(data: bytes, name: str) -> schemas.FullVmConfiguration:
    try:
        return msgspec.json.decode(data, type=schemas.FullVmConfiguration)
    except msgspec.ValidationError as error:
        raise ConfigError(f"config file {name}: {error}") from None
    except msgspec.DecodeError as error:
        raise ConfigError(f"config file {name}: {_where(data, str(error))}") from None


def _where(data: bytes, message: str) -> str:
    """msgspec says ``(byte N)``; a person looks for a line and a column."""
    head, found, tail = message.rpartition("(byte ")
    if not found or not tail.rstrip(")").isdigit():
        return message
    offset = int(tail.rstrip(")"))
    line = data.count(b"\n", 0, offset) + 1
    column = offset - (data.rfind(b"\n", 0, offset) + 1) + 1
    return f"{head}(line {line}, column {column})"


def _refuse_unsupported(config: schemas.FullVmConfiguration, name: str) -> None:
    for field, resource in _UNSUPPORTED_KEYS.items():
        if getattr(config, field):
            key = field.replace("_", "-")
            raise ConfigError(f"config file {name}: {key}: {NOT_SUPPORTED_PREFIX}{UNSUPPORTED[resource]}")


def _add(
    found: list[Action],
    name: str,
    key: str,
    body: Item | None,
    parser: Callable[[Item], Action],
) -> None:
    if body is None:
        return
    try:
        found.append(parser(body))
    except RequestError as error:
        raise ConfigError(f"config file {name}: {key}: {error.message}") from None


__all__ = ["config_actions", "load_config_file"]
