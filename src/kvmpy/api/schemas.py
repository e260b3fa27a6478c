"""Firecracker's request bodies (src/firecracker/swagger/firecracker.yaml) as msgspec Structs.

msgspec checks types, required fields and refuses unknown fields while it
decodes, so no body is looked at by hand before it has the right shape. What
the types cannot say (an id that matches the path, a value kvmpy does not
support) is checked in :mod:`kvmpy.api.parse`.

Field names are Firecracker's. kvmpy's extensions are optional fields whose
absence gives Firecracker's behaviour (docs/api.md lists them):
``Drive.direct`` (O_DIRECT) and ``SerialDevice.console`` (serial or virtio). One resource
is kvmpy's alone, since Firecracker has no device assignment: :class:`VfioDevice`.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Positive = Annotated[int, msgspec.Meta(ge=1)]


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    """Every body refuses fields it does not know (Firecracker's ``deny_unknown_fields``)."""


class TokenBucket(_Body):
    size: NonNegative
    refill_time: NonNegative
    one_time_burst: NonNegative | None = None


class RateLimiter(_Body):
    bandwidth: TokenBucket | None = None
    ops: TokenBucket | None = None


class BootSource(_Body):
    kernel_image_path: str
    initrd_path: str | None = None
    boot_args: str | None = None


class MachineConfiguration(_Body):
    """PUT /machine-config: the two sizes are required, the rest fall back to their defaults."""

    vcpu_count: Positive
    mem_size_mib: Positive
    smt: bool = False
    track_dirty_pages: bool = False
    huge_pages: Literal["None", "Transparent", "2M"] = "None"
    #: Deprecated in Firecracker; any string is taken so the refusal can say why.
    cpu_template: str | None = None


class MachineConfigurationUpdate(_Body):
    """PATCH /machine-config: only the fields given change."""

    vcpu_count: Positive | None = None
    mem_size_mib: Positive | None = None
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    huge_pages: Literal["None", "Transparent", "2M"] | None = None
    cpu_template: str | None = None


class Drive(_Body):
    drive_id: str
    is_root_device: bool
    partuuid: str | None = None
    cache_type: Literal["Unsafe", "Writeback"] = "Unsafe"
    is_read_only: bool | None = None
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None
    io_engine: Literal["Sync", "Async"] | None = None
    #: vhost-user-block: the socket of the daemon that serves the drive (no path_on_host).
    socket: str | None = None
    #: kvmpy: open the image with O_DIRECT, bypassing the host's page cache.
    direct: bool = False


class PartialDrive(_Body):
    drive_id: str
    path_on_host: str | None = None
    rate_limiter: RateLimiter | None = None
    #: kvmpy: a vhost-user drive whose back end was lost connects to one again.
    reconnect: bool = False


class NetworkInterface(_Body):
    iface_id: str
    host_dev_name: str
    guest_mac: str | None = None
    mtu: int | None = None
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class PartialNetworkInterface(_Body):
    iface_id: str
    rx_rate_limiter: RateLimiter | None = None
    tx_rate_limiter: RateLimiter | None = None


class VfioDevice(_Body):
    """PUT /vfio/{id} (kvmpy's): a host PCI device, bound to vfio-pci, for the guest."""

    vfio_id: str
    #: DDDD:BB:DD.F, or BB:DD.F in domain 0000.
    host_bdf: str


class EntropyDevice(_Body):
    rate_limiter: RateLimiter | None = None


class Balloon(_Body):
    amount_mib: NonNegative
    deflate_on_oom: bool
    stats_polling_interval_s: NonNegative = 0
    free_page_reporting: bool = False


class BalloonUpdate(_Body):
    amount_mib: NonNegative


class BalloonStatsUpdate(_Body):
    stats_polling_interval_s: NonNegative


class SerialDevice(_Body):
    serial_out_path: str | None = None
    rate_limiter: TokenBucket | None = None
    #: kvmpy: where the terminal connects, the 16550A ("serial") or virtio-console ("virtio").
    console: Literal["serial", "virtio"] | None = None


class Logger(_Body):
    log_path: str | None = None
    level: str | None = None
    show_level: bool | None = None
    show_log_origin: bool | None = None
    module: str | None = None


class Metrics(_Body):
    metrics_path: str
    emit_id: bool = False
    properties: dict[str, str] | None = None


class InstanceActionInfo(_Body):
    action_type: Literal["FlushMetrics", "InstanceStart", "SendCtrlAltDel"]


class Vm(_Body):
    state: Literal["Paused", "Resumed"]


class SnapshotCreateParams(_Body):
    snapshot_path: str
    mem_file_path: str
    snapshot_type: Literal["Full", "Diff"] = "Full"


class MemoryBackend(_Body):
    backend_type: Literal["File", "Uffd"]
    backend_path: str


class NetworkOverride(_Body):
    iface_id: str
    host_dev_name: str


class VsockOverride(_Body):
    uds_path: str


class SnapshotLoadParams(_Body):
    """PUT /snapshot/load: exactly one of ``mem_file_path`` (deprecated) and ``mem_backend``."""

    snapshot_path: str
    mem_file_path: str | None = None
    mem_backend: MemoryBackend | None = None
    track_dirty_pages: bool = False
    #: Deprecated in Firecracker for track_dirty_pages.
    enable_diff_snapshots: bool = False
    resume_vm: bool = False
    network_overrides: list[NetworkOverride] = []
    vsock_override: VsockOverride | None = None
    clock_realtime: bool = False
    huge_pages: Literal["Snapshot", "None", "Transparent", "2M"] | None = None


class KvmpyStop(_Body):
    """PUT /kvmpy/stop: end the VM from the host (Firecracker has no such call; it is killed)."""

    reason: str = "stopped through the API"


class KvmpyMigrate(_Body):
    """PUT /kvmpy/migrate: send the running VM to a kvmpy started with ``--incoming``."""

    destination: str
    downtime_ms: Annotated[int, msgspec.Meta(ge=1, le=60_000)] = 300
    max_rounds: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 30
    on_limit: Literal["pause", "cancel"] = "pause"


class FullVmConfiguration(_Body):
    """``--config-file`` and GET /vm/config: every resource under Firecracker's key.

    Keys for resources kvmpy does not have are accepted when empty (null or []),
    as GET /vm/config writes them, so its output loads back.
    """

    boot_source: BootSource | None = msgspec.field(name="boot-source", default=None)
    drives: list[Drive] = []
    machine_config: MachineConfiguration | None = msgspec.field(name="machine-config", default=None)
    network_interfaces: list[NetworkInterface] = msgspec.field(name="network-interfaces", default=[])
    #: kvmpy: host PCI devices assigned through VFIO (PUT /vfio/{id} bodies).
    vfio: list[VfioDevice] = []
    entropy: EntropyDevice | None = None
    logger: Logger | None = None
    metrics: Metrics | None = None
    #: kvmpy: Firecracker has no serial key in its config file.
    serial: SerialDevice | None = None
    balloon: Balloon | None = None
    vsock: dict[str, object] | None = None
    mmds_config: dict[str, object] | None = msgspec.field(name="mmds-config", default=None)
    cpu_config: dict[str, object] | str | None = msgspec.field(name="cpu-config", default=None)
    pmem: list[dict[str, object]] = []
    memory_hotplug: dict[str, object] | None = msgspec.field(name="memory-hotplug", default=None)


__all__ = [
    "Balloon",
    "BalloonStatsUpdate",
    "BalloonUpdate",
    "BootSource",
    "Drive",
    "EntropyDevice",
    "FullVmConfiguration",
    "InstanceActionInfo",
    "KvmpyStop",
    "Logger",
    "MachineConfiguration",
    "MachineConfigurationUpdate",
    "Metrics",
    "NetworkInterface",
    "PartialDrive",
    "PartialNetworkInterface",
    "RateLimiter",
    "SerialDevice",
    "SnapshotCreateParams",
    "SnapshotLoadParams",
    "TokenBucket",
    "VfioDevice",
    "Vm",
]
