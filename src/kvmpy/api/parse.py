"""Validated request bodies become actions (Firecracker's ``parse_put_*`` and ``parse_patch_*``).

Each function takes a body already decoded into its :mod:`~kvmpy.api.schemas`
Struct and returns the action for :meth:`Vmm.submit`, or raises
:class:`~kvmpy.api.errors.RequestError` for what the types could not refuse:
an id that does not match the path, a value Firecracker has and kvmpy does not.
The HTTP router and ``--config-file`` both go through here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TypeVar

import msgspec

from kvmpy.api import schemas
from kvmpy.api.errors import DESERIALIZE_PREFIX, RequestError, not_supported
from kvmpy.errors import ConfigError
from kvmpy.vmm.actions import (
    ConfigureBootSource,
    ConfigureLogger,
    ConfigureMachine,
    ConfigureMetrics,
    ConfigureSerial,
    CreateSnapshot,
    FlushMetrics,
    InsertBlockDevice,
    InsertNetworkDevice,
    InsertVfioDevice,
    LoadSnapshot,
    Migrate,
    Pause,
    Resume,
    SendCtrlAltDel,
    SetBalloon,
    SetEntropyDevice,
    StartInstance,
    Stop,
    UpdateBlockDevice,
    UpdateNetworkDevice,
)
from kvmpy.vmm.config import (
    BalloonConfig,
    DiskConfig,
    LoggerConfig,
    MetricsConfig,
    NetConfig,
    RateLimiterConfig,
    TokenBucketConfig,
    VfioConfig,
)

Body = TypeVar("Body", bound=msgspec.Struct)

_ID = re.compile(r"^\w+$")
_MAC = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
_LEVELS = {
    "off": "Off",
    "trace": "Trace",
    "debug": "Debug",
    "info": "Info",
    "warn": "Warning",
    "warning": "Warning",
    "error": "Error",
}


def decode(body: bytes, kind: type[Body]) -> Body:
    """Decode and validate ``body`` as ``kind``; malformed JSON and wrong shapes both fail here."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.DecodeError as error:  # ValidationError is a DecodeError too
        raise RequestError(f"{DESERIALIZE_PREFIX}{error}.") from None


def checked_id(token: str | None) -> str:
    """The resource id from the path, with Firecracker's rules and messages."""
    if not token:
        raise RequestError("The ID cannot be empty.")
    if not _ID.match(token):
        raise RequestError("API Resource IDs can only contain alphanumeric characters and underscores.")
    return token


def _path(value: str, field: str) -> Path:
    if not value:
        raise RequestError(f"{field} cannot be empty.")
    if "\0" in value:  # JSON can spell one (\u0000); no file name holds one, and open() raises on it
        raise RequestError(f"{field} cannot contain a NUL character.")
    return Path(value)


def _bucket(bucket: schemas.TokenBucket | None) -> TokenBucketConfig | None:
    """A bucket of size 0 or refill time 0 is no limit at all, as in Firecracker."""
    if bucket is None or bucket.size == 0 or bucket.refill_time == 0:
        return None
    return TokenBucketConfig(bucket.size, bucket.refill_time, bucket.one_time_burst or 0)


def rate_limiter(limiter: schemas.RateLimiter | None) -> RateLimiterConfig | None:
    if limiter is None:
        return None
    return RateLimiterConfig(bandwidth=_bucket(limiter.bandwidth), ops=_bucket(limiter.ops))


def boot_source(body: schemas.BootSource) -> ConfigureBootSource:
    initrd = _path(body.initrd_path, "initrd_path") if body.initrd_path is not None else None
    return ConfigureBootSource(
        kernel=_path(body.kernel_image_path, "kernel_image_path"),
        initrd=initrd,
        cmdline=body.boot_args or "",
    )


def _huge_pages(value: str | None) -> bool | None:
    if value == "Transparent":
        raise not_supported(
            'huge_pages "Transparent": kvmpy backs guest memory with 4 KiB pages or 2 MiB hugetlbfs '
            'pages, not madvise(MADV_HUGEPAGE); use "None" or "2M".'
        )
    return None if value is None else value == "2M"


def _check_cpu_template(value: str | None) -> None:
    if value not in (None, "None"):
        raise not_supported(
            f'cpu_template "{value}": kvmpy has no CPU templates, it gives the guest the CPUID '
            'KVM supports; use "None".'
        )


def machine(body: schemas.MachineConfiguration) -> ConfigureMachine:
    """PUT /machine-config: every field is set, the missing ones to Firecracker's defaults."""
    _check_cpu_template(body.cpu_template)
    return ConfigureMachine(
        cpus=body.vcpu_count,
        memory_mib=body.mem_size_mib,
        smt=body.smt,
        track_dirty_pages=body.track_dirty_pages,
        hugepages=_huge_pages(body.huge_pages),
        partial=False,
    )


def machine_update(body: schemas.MachineConfigurationUpdate) -> ConfigureMachine:
    """PATCH /machine-config: only what is given changes; an empty update is refused."""
    fields = (body.vcpu_count, body.mem_size_mib, body.smt, body.track_dirty_pages, body.huge_pages)
    if all(value is None for value in fields) and body.cpu_template is None:
        raise RequestError("Empty PATCH request.")
    _check_cpu_template(body.cpu_template)
    return ConfigureMachine(
        cpus=body.vcpu_count,
        memory_mib=body.mem_size_mib,
        smt=body.smt,
        track_dirty_pages=body.track_dirty_pages,
        hugepages=_huge_pages(body.huge_pages),
        partial=True,
    )


def _same_id(path_id: str | None, body_id: str) -> None:
    """Firecracker's words for a drive (and kvmpy's for a VFIO device) whose ids differ."""
    if path_id is not None and path_id != body_id:
        raise RequestError("The id from the path does not match the id from the body!")


def drive(body: schemas.Drive, path_id: str | None = None) -> InsertBlockDevice:
    """PUT /drives/{id}; ``path_id`` is None for a drive from a config file."""
    _same_id(path_id, body.drive_id)
    if body.socket is not None:
        return _vhost_user_drive(body, body.socket)
    if body.io_engine == "Async":
        raise not_supported(
            'io_engine "Async" (io_uring): kvmpy\'s virtio-blk back end does synchronous I/O; '
            'use "Sync" (or leave io_engine out).'
        )
    if body.path_on_host is None:
        raise RequestError(f"Drive config error: drive {body.drive_id} needs path_on_host.")
    disk = DiskConfig(
        path=_path(body.path_on_host, "path_on_host"),
        read_only=bool(body.is_read_only),
        id=body.drive_id,
        direct=body.direct,
        is_root_device=body.is_root_device,
        partuuid=body.partuuid or "",
        cache_type=body.cache_type,
        rate_limiter=rate_limiter(body.rate_limiter),
    )
    return InsertBlockDevice(disk)


def _vhost_user_drive(body: schemas.Drive, socket: str) -> InsertBlockDevice:
    """A vhost-user-block drive (Firecracker's ``socket``): the daemon there owns the image."""
    if body.path_on_host is not None or body.is_read_only is not None or body.rate_limiter is not None:
        raise RequestError(
            f"Drive config error: vhost-user drive {body.drive_id} takes a socket and no"
            " path_on_host, is_read_only or rate_limiter."
        )
    path = _path(socket, "socket")
    disk = DiskConfig(
        path=path,
        id=body.drive_id,
        is_root_device=body.is_root_device,
        partuuid=body.partuuid or "",
        cache_type=body.cache_type,
        socket=path,
    )
    return InsertBlockDevice(disk)


def drive_update(body: schemas.PartialDrive, path_id: str) -> UpdateBlockDevice:
    _same_id(path_id, body.drive_id)
    path = _path(body.path_on_host, "path_on_host") if body.path_on_host is not None else None
    return UpdateBlockDevice(body.drive_id, path, rate_limiter(body.rate_limiter), reconnect=body.reconnect)


def _same_iface_id(path_id: str | None, body_id: str) -> None:
    if path_id is not None and path_id != body_id:
        raise RequestError(
            f"The id from the path [{path_id}] does not match the id from the body [{body_id}]!"
        )


def network_interface(body: schemas.NetworkInterface, path_id: str | None = None) -> InsertNetworkDevice:
    _same_iface_id(path_id, body.iface_id)
    if body.mtu is not None:
        raise not_supported("mtu: kvmpy's virtio-net does not offer VIRTIO_NET_F_MTU yet; leave mtu out.")
    if body.guest_mac is not None and not _MAC.match(body.guest_mac):
        raise RequestError(
            f"{DESERIALIZE_PREFIX}invalid guest_mac `{body.guest_mac}`: use six hex bytes, 06:00:ac:10:00:02."
        )
    if not body.host_dev_name:
        raise RequestError("host_dev_name cannot be empty.")
    net = NetConfig(
        tap=body.host_dev_name,
        mac=(body.guest_mac or "").lower(),
        id=body.iface_id,
        rx_rate_limiter=rate_limiter(body.rx_rate_limiter),
        tx_rate_limiter=rate_limiter(body.tx_rate_limiter),
    )
    return InsertNetworkDevice(net)


def network_interface_update(body: schemas.PartialNetworkInterface, path_id: str) -> UpdateNetworkDevice:
    _same_iface_id(path_id, body.iface_id)
    return UpdateNetworkDevice(
        body.iface_id, rate_limiter(body.rx_rate_limiter), rate_limiter(body.tx_rate_limiter)
    )


def vfio_device(body: schemas.VfioDevice, path_id: str | None = None) -> InsertVfioDevice:
    """PUT /vfio/{id}; ``path_id`` is None for a device from a config file, whose id is checked
    by the path's rules, since it becomes the device's name on kvmpy's PCI bus."""
    _same_id(path_id, body.vfio_id)
    device_id = checked_id(body.vfio_id)
    from kvmpy.vfio.sysfs import parse_bdf  # kvmpy.vfio loads with the first VFIO body only

    try:
        bdf = parse_bdf(body.host_bdf, field="host_bdf")
    except ConfigError as error:
        raise RequestError(f"{DESERIALIZE_PREFIX}{error}.") from None
    return InsertVfioDevice(VfioConfig(bdf, id=device_id))


def entropy(body: schemas.EntropyDevice) -> SetEntropyDevice:
    return SetEntropyDevice(rate_limiter(body.rate_limiter))


def balloon(body: schemas.Balloon) -> SetBalloon:
    return SetBalloon(
        BalloonConfig(
            body.amount_mib,
            deflate_on_oom=body.deflate_on_oom,
            stats_polling_interval_s=body.stats_polling_interval_s,
            free_page_reporting=body.free_page_reporting,
        )
    )


def serial(body: schemas.SerialDevice) -> ConfigureSerial:
    if body.rate_limiter is not None:
        raise not_supported("a serial rate_limiter: kvmpy's 16550A output is not rate-limited.")
    path = _path(body.serial_out_path, "serial_out_path") if body.serial_out_path is not None else None
    return ConfigureSerial(path=path, console=body.console)


def logger(body: schemas.Logger) -> ConfigureLogger:
    level = "Info"  # the swagger's default
    if body.level is not None:
        if body.level.lower() not in _LEVELS:
            raise RequestError(
                f"{DESERIALIZE_PREFIX}Invalid LevelFilter `{body.level}`: use Error, Warning, Info, "
                "Debug, Trace or Off."
            )
        level = _LEVELS[body.level.lower()]
    path = _path(body.log_path, "log_path") if body.log_path is not None else None
    config = LoggerConfig(
        path=path,
        level=level,
        show_level=bool(body.show_level),
        show_log_origin=bool(body.show_log_origin),
        module=body.module or "",
    )
    return ConfigureLogger(config)


def metrics(body: schemas.Metrics) -> ConfigureMetrics:
    if body.emit_id or body.properties:
        raise not_supported("metrics emit_id and properties: kvmpy's metrics lines carry neither yet.")
    return ConfigureMetrics(MetricsConfig(_path(body.metrics_path, "metrics_path")))


def instance_action(body: schemas.InstanceActionInfo) -> StartInstance | SendCtrlAltDel | FlushMetrics:
    if body.action_type == "InstanceStart":
        return StartInstance()
    if body.action_type == "SendCtrlAltDel":
        return SendCtrlAltDel()
    return FlushMetrics()


def vm_state(body: schemas.Vm) -> Pause | Resume:
    return Pause() if body.state == "Paused" else Resume()


def snapshot_create(body: schemas.SnapshotCreateParams) -> CreateSnapshot:
    return CreateSnapshot(
        snapshot_path=_path(body.snapshot_path, "snapshot_path"),
        mem_file_path=_path(body.mem_file_path, "mem_file_path"),
        snapshot_type=body.snapshot_type,
    )


def _memory_file(body: schemas.SnapshotLoadParams) -> Path:
    """Firecracker's rule: exactly one of mem_file_path and mem_backend, and kvmpy's: a File."""
    if body.mem_file_path is not None and body.mem_backend is not None:
        raise RequestError(
            f"{DESERIALIZE_PREFIX}too many fields: either `mem_backend` or `mem_file_path` exclusively "
            "is required."
        )
    if body.mem_backend is not None:
        if body.mem_backend.backend_type == "Uffd":
            raise not_supported(
                "the Uffd memory backend: kvmpy maps the memory file itself (MAP_PRIVATE); use File."
            )
        return _path(body.mem_backend.backend_path, "backend_path")
    if body.mem_file_path is None:
        raise RequestError(
            f"{DESERIALIZE_PREFIX}missing field: either `mem_backend` or `mem_file_path` is required."
        )
    return _path(body.mem_file_path, "mem_file_path")


def snapshot_load(body: schemas.SnapshotLoadParams) -> LoadSnapshot:
    memory = _memory_file(body)
    if body.vsock_override is not None:
        raise not_supported("vsock_override: kvmpy's vsock (--vsock cid=N) cannot be snapshotted yet.")
    if body.huge_pages in ("Transparent", "2M"):
        raise not_supported(
            f'huge_pages "{body.huge_pages}" on restore: kvmpy maps the memory file with 4 KiB pages.'
        )
    return LoadSnapshot(
        snapshot_path=_path(body.snapshot_path, "snapshot_path"),
        mem_file_path=memory,
        resume_vm=body.resume_vm,
        track_dirty_pages=body.track_dirty_pages or body.enable_diff_snapshots,
        network_overrides=tuple((o.iface_id, o.host_dev_name) for o in body.network_overrides),
        clock_realtime=body.clock_realtime,
    )


def stop(body: schemas.KvmpyStop) -> Stop:
    return Stop(body.reason)


def migrate(body: schemas.KvmpyMigrate) -> Migrate:
    return Migrate(body.destination, body.downtime_ms, body.max_rounds, body.on_limit)


__all__ = [
    "balloon",
    "boot_source",
    "migrate",
    "checked_id",
    "decode",
    "drive",
    "drive_update",
    "entropy",
    "instance_action",
    "logger",
    "machine",
    "machine_update",
    "metrics",
    "network_interface",
    "network_interface_update",
    "rate_limiter",
    "serial",
    "snapshot_create",
    "snapshot_load",
    "stop",
    "vfio_device",
    "vm_state",
]
