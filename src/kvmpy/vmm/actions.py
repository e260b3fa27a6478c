"""What can be asked of a VMM, as plain data (Firecracker's ``VmmAction`` split).

The HTTP API, ``--config-file``, the command line and signals all turn what
they receive into these frozen dataclasses and hand them to
:meth:`kvmpy.vmm.vmm.Vmm.submit`; nothing above the VMM touches a machine.
Which actions are allowed before and after the VM starts is data, kept here
in one place (Firecracker's pre-boot and runtime API controllers).

Results are plain data as well: ``None`` for a command, or one of the result
dataclasses below. A request that cannot be carried out raises
:class:`ActionError` with a message fit for ``{"fault_message": ...}``.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import msgspec

from kvmpy.errors import KvmpyError
from kvmpy.vmm.config import (
    BalloonConfig,
    DiskConfig,
    LoggerConfig,
    MetricsConfig,
    NetConfig,
    RateLimiterConfig,
    VfioConfig,
)


class ActionError(KvmpyError):
    """An action was refused or failed; the message says why (the API answers 400 with it)."""


class VmState(Enum):
    """The lifecycle of a VM, with Firecracker's names for the states it reports."""

    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"
    STOPPED = "Stopped"


# --- configuration (before InstanceStart, unless the runtime table says otherwise) -------
class ConfigureBootSource(msgspec.Struct, frozen=True):
    kernel: Path
    initrd: Path | None = None
    cmdline: str = ""


class ConfigureMachine(msgspec.Struct, frozen=True):
    """PUT (``partial=False``: every field given) or PATCH (``partial=True``) /machine-config."""

    cpus: int | None = None
    memory_mib: int | None = None
    smt: bool | None = None
    track_dirty_pages: bool | None = None
    hugepages: bool | None = None
    partial: bool = False


class InsertBlockDevice(msgspec.Struct, frozen=True):
    """PUT /drives/{id}: add the drive, or replace the one with the same id."""

    disk: DiskConfig


class UpdateBlockDevice(msgspec.Struct, frozen=True):
    """PATCH /drives/{id}: a new backing file (the guest sees the new size) or rate limiter;
    or, for a vhost-user drive whose back end was lost, a back end again (``reconnect``)."""

    drive_id: str
    path: Path | None = None
    rate_limiter: RateLimiterConfig | None = None
    reconnect: bool = False


class InsertNetworkDevice(msgspec.Struct, frozen=True):
    """PUT /network-interfaces/{id}."""

    net: NetConfig


class UpdateNetworkDevice(msgspec.Struct, frozen=True):
    """PATCH /network-interfaces/{id}: new rate limiters."""

    iface_id: str
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None


class InsertVfioDevice(msgspec.Struct, frozen=True):
    """PUT /vfio/{id} (kvmpy's): assign a host PCI device, or replace the entry with the same id.

    Before the start only: kvmpy's PCI bus has no hotplug."""

    device: VfioConfig


class SetEntropyDevice(msgspec.Struct, frozen=True):
    """PUT /entropy: a virtio-rng device."""

    rate_limiter: RateLimiterConfig | None = None


class SetBalloon(msgspec.Struct, frozen=True):
    """PUT /balloon: a virtio-balloon device (before the VM starts)."""

    config: BalloonConfig


class UpdateBalloon(msgspec.Struct, frozen=True):
    """PATCH /balloon: a new target for the running guest's balloon."""

    amount_mib: int


class UpdateBalloonStatistics(msgspec.Struct, frozen=True):
    """PATCH /balloon/statistics: how often the driver is asked for its figures."""

    stats_polling_interval_s: int


class GetBalloon(msgspec.Struct, frozen=True):
    pass


class GetBalloonStatistics(msgspec.Struct, frozen=True):
    pass


class ConfigureSerial(msgspec.Struct, frozen=True):
    """PUT /serial: the 16550A's output appended to ``path`` (None: the process's standard output).

    ``console`` is kvmpy's: where the terminal connects, "serial" (the 16550A) or
    "virtio" (virtio-console, hvc0); None leaves it as configured.
    """

    path: Path | None = None
    console: str | None = None


class ConfigureLogger(msgspec.Struct, frozen=True):
    logger: LoggerConfig


class ConfigureMetrics(msgspec.Struct, frozen=True):
    metrics: MetricsConfig


# --- commands -------------------------------------------------------------------------
class StartInstance(msgspec.Struct, frozen=True):
    pass


class SendCtrlAltDel(msgspec.Struct, frozen=True):
    """Ctrl-Alt-Del on the i8042 keyboard: Linux reboots or powers off as it is configured."""


class FlushMetrics(msgspec.Struct, frozen=True):
    pass


class Pause(msgspec.Struct, frozen=True):
    pass


class Resume(msgspec.Struct, frozen=True):
    pass


class CreateSnapshot(msgspec.Struct, frozen=True):
    """PUT /snapshot/create: the state file and the memory file of a paused VM."""

    snapshot_path: Path
    mem_file_path: Path
    snapshot_type: str = "Full"


class LoadSnapshot(msgspec.Struct, frozen=True):
    """PUT /snapshot/load: a fresh VMM becomes the snapshotted VM (paused unless ``resume_vm``)."""

    snapshot_path: Path
    mem_file_path: Path
    resume_vm: bool = False
    #: Record dirty pages from the start, so the next snapshot can be a Diff.
    track_dirty_pages: bool = False
    #: (iface_id, tap): a restored interface on another tap (Firecracker's network_overrides).
    network_overrides: tuple[tuple[str, str], ...] = ()
    #: Advance the guest's clock by the time the VM spent in the snapshot (KVM_CLOCK_REALTIME),
    #: as Firecracker's clock_realtime; otherwise kvmclock goes on from where it was.
    clock_realtime: bool = False


class Migrate(msgspec.Struct, frozen=True):
    """Send the running VM to a kvmpy started with ``--incoming``; this VMM ends once it runs there."""

    destination: str  # tcp:HOST:PORT or unix:PATH
    downtime_ms: int = 300
    max_rounds: int = 30
    #: A limit hit before the downtime fits the budget: "pause" finishes anyway, "cancel" gives up.
    on_limit: str = "pause"


class IncomingMigration(msgspec.Struct, frozen=True):
    """Wait on ``address`` for a migrating VM and become it."""

    address: str


class Stop(msgspec.Struct, frozen=True):
    """End the VM from the host (the CLI's Ctrl-C, SIGTERM, ``kvmpy ctl quit``)."""

    reason: str = "stopped from the host"


# --- queries --------------------------------------------------------------------------
class GetInstanceInfo(msgspec.Struct, frozen=True):
    pass


class GetVmConfig(msgspec.Struct, frozen=True):
    """GET /vm/config and GET /machine-config: the result is the current VmConfig."""


class GetMigrationStatus(msgspec.Struct, frozen=True):
    """How the current (or last) migration is going; answered even while it runs."""


class InstanceInfo(msgspec.Struct, frozen=True):
    id: str
    state: VmState
    vmm_version: str
    app_name: str = "kvmpy"


# --- the monitor (kvmpy's own, under /kvmpy/) ---------------------------------------------
class GetRegisters(msgspec.Struct, frozen=True):
    vcpu: int = 0


class TranslateAddress(msgspec.Struct, frozen=True):
    """The guest page-table walk of ``gva`` from ``vcpu``'s CR3, down to the host frame."""

    gva: int
    vcpu: int = 0


class ReadMemory(msgspec.Struct, frozen=True):
    """``length`` bytes at ``address``, a guest-virtual (through ``vcpu``'s page tables) or physical one."""

    address: int
    length: int
    physical: bool = False
    vcpu: int = 0


class GetMemoryTree(msgspec.Struct, frozen=True):
    pass


class GetIrqState(msgspec.Struct, frozen=True):
    pass


class GetVcpus(msgspec.Struct, frozen=True):
    pass


class GetStats(msgspec.Struct, frozen=True):
    pass


Action = (
    ConfigureBootSource
    | ConfigureMachine
    | InsertBlockDevice
    | UpdateBlockDevice
    | InsertNetworkDevice
    | UpdateNetworkDevice
    | InsertVfioDevice
    | SetEntropyDevice
    | SetBalloon
    | UpdateBalloon
    | UpdateBalloonStatistics
    | GetBalloon
    | GetBalloonStatistics
    | ConfigureSerial
    | ConfigureLogger
    | ConfigureMetrics
    | StartInstance
    | SendCtrlAltDel
    | FlushMetrics
    | Pause
    | Resume
    | CreateSnapshot
    | LoadSnapshot
    | Migrate
    | IncomingMigration
    | Stop
    | GetInstanceInfo
    | GetVmConfig
    | GetMigrationStatus
    | GetRegisters
    | TranslateAddress
    | ReadMemory
    | GetMemoryTree
    | GetIrqState
    | GetVcpus
    | GetStats
)

_QUERIES: frozenset[type] = frozenset({GetInstanceInfo, GetVmConfig, GetMigrationStatus})
#: Queries that read only plain state: answered on the caller's thread at once, even while
#: the VMM thread is busy with a long action (a migration, a snapshot).
IMMEDIATE: frozenset[type] = frozenset({GetInstanceInfo, GetMigrationStatus})
_MONITOR: frozenset[type] = frozenset(
    {GetRegisters, TranslateAddress, ReadMemory, GetMemoryTree, GetIrqState, GetVcpus, GetStats}
)

#: What may be asked before InstanceStart (Firecracker's pre-boot table).
ALLOWED_BEFORE_START: frozenset[type] = frozenset(
    {
        ConfigureBootSource,
        ConfigureMachine,
        InsertBlockDevice,
        InsertNetworkDevice,
        InsertVfioDevice,
        SetEntropyDevice,
        SetBalloon,
        GetBalloon,
        ConfigureSerial,
        ConfigureLogger,
        ConfigureMetrics,
        StartInstance,
        LoadSnapshot,
        IncomingMigration,
        Stop,
    }
    | _QUERIES
)

#: What may be asked once the VM has started, running or paused (Firecracker's runtime table).
ALLOWED_AFTER_START: frozenset[type] = frozenset(
    {
        UpdateBlockDevice,
        UpdateNetworkDevice,
        SendCtrlAltDel,
        UpdateBalloon,
        UpdateBalloonStatistics,
        GetBalloon,
        GetBalloonStatistics,
        FlushMetrics,
        Pause,
        Resume,
        CreateSnapshot,
        Migrate,
        Stop,
    }
    | _QUERIES
    | _MONITOR
)

#: Firecracker's messages for a request in the wrong phase.
NOT_ALLOWED_BEFORE_START = "The requested operation is not supported before starting the microVM."
NOT_ALLOWED_AFTER_START = "The requested operation is not supported after starting the microVM."


def check_allowed(action: Any, started: bool) -> None:
    """Raise ActionError if ``action`` is not allowed in this phase of the VM's life."""
    table = ALLOWED_AFTER_START if started else ALLOWED_BEFORE_START
    if type(action) not in table:
        raise ActionError(NOT_ALLOWED_AFTER_START if started else NOT_ALLOWED_BEFORE_START)


__all__ = [
    "ALLOWED_AFTER_START",
    "ALLOWED_BEFORE_START",
    "IMMEDIATE",
    "Action",
    "ActionError",
    "ConfigureBootSource",
    "ConfigureLogger",
    "ConfigureMachine",
    "ConfigureMetrics",
    "ConfigureSerial",
    "CreateSnapshot",
    "FlushMetrics",
    "GetInstanceInfo",
    "GetBalloon",
    "GetBalloonStatistics",
    "GetIrqState",
    "GetMigrationStatus",
    "GetMemoryTree",
    "GetRegisters",
    "GetStats",
    "GetVcpus",
    "GetVmConfig",
    "InsertBlockDevice",
    "InsertNetworkDevice",
    "InsertVfioDevice",
    "IncomingMigration",
    "InstanceInfo",
    "LoadSnapshot",
    "Migrate",
    "Pause",
    "ReadMemory",
    "Resume",
    "SendCtrlAltDel",
    "SetBalloon",
    "SetEntropyDevice",
    "StartInstance",
    "Stop",
    "TranslateAddress",
    "UpdateBalloon",
    "UpdateBalloonStatistics",
    "UpdateBlockDevice",
    "UpdateNetworkDevice",
    "VmState",
    "check_allowed",
]
