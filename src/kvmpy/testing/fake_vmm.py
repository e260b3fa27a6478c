"""A stand-in for ``Vmm.submit`` that keeps the state and the config, and builds no machine.

It records every action, refuses what the pre-boot and runtime tables refuse
(:func:`kvmpy.vmm.actions.check_allowed`, so phase errors in API tests are the
real ones), applies configuration actions to a :class:`VmConfig` the way the
VMM does, and walks the lifecycle Not started -> Running <-> Paused -> Stopped.
Monitor queries answer with the query itself, which is what a routing test
needs to see.
"""

from __future__ import annotations

import threading

import msgspec

from kvmpy.vmm.actions import (
    Action,
    ActionError,
    ConfigureBootSource,
    ConfigureLogger,
    ConfigureMachine,
    ConfigureMetrics,
    ConfigureSerial,
    CreateSnapshot,
    GetBalloon,
    GetBalloonStatistics,
    GetInstanceInfo,
    GetIrqState,
    GetMemoryTree,
    GetRegisters,
    GetStats,
    GetVcpus,
    GetVmConfig,
    InsertBlockDevice,
    InsertNetworkDevice,
    InsertVfioDevice,
    InstanceInfo,
    LoadSnapshot,
    Pause,
    ReadMemory,
    Resume,
    SetBalloon,
    SetEntropyDevice,
    StartInstance,
    Stop,
    TranslateAddress,
    UpdateBalloon,
    UpdateBlockDevice,
    UpdateNetworkDevice,
    VmState,
    check_allowed,
)
from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig

#: Firecracker's words, as the real VMM answers them.
SNAPSHOT_AFTER_CONFIG = "Loading a microVM snapshot not allowed after configuring boot-specific resources."
_MONITOR = (GetRegisters, TranslateAddress, ReadMemory, GetMemoryTree, GetIrqState, GetVcpus, GetStats)


class FakeVmm:
    """``submit`` for tests: thread-safe, blocking, with the real phase tables."""

    def __init__(self, vm_id: str = "fake-vm", version: str = "0.1.0") -> None:
        self.id = vm_id
        self.version = version
        self.state = VmState.NOT_STARTED
        self.config = VmConfig()
        self.actions: list[Action] = []
        #: Raised by the next submit (once), to test how the API takes a VMM failure.
        self.fail_next: Exception | None = None
        self._lock = threading.Lock()

    @property
    def started(self) -> bool:
        return self.state is not VmState.NOT_STARTED

    def submit(self, action: Action) -> object:
        with self._lock:
            self.actions.append(action)
            check_allowed(action, self.started)
            if self.fail_next is not None:
                error, self.fail_next = self.fail_next, None
                raise error
            return self._apply(action)

    def _apply(self, action: Action) -> object:
        if isinstance(action, GetInstanceInfo):
            return InstanceInfo(self.id, self.state, self.version)
        if isinstance(action, GetVmConfig):
            return self.config
        if isinstance(action, _MONITOR):
            return {"query": type(action).__name__, **msgspec.structs.asdict(action)}
        if isinstance(action, GetBalloon | GetBalloonStatistics):
            if self.config.balloon is None:
                raise ActionError("No balloon device configured (PUT /balloon before the VM starts).")
            if isinstance(action, GetBalloon):
                return self.config.balloon
            return {"target_pages": self.config.balloon.amount_mib * 256, "actual_pages": 0}
        if isinstance(action, StartInstance | Pause | Resume | Stop):
            self._lifecycle(action)
        elif isinstance(action, CreateSnapshot | LoadSnapshot):
            self._snapshot(action)
        else:
            self.config = _configured(self.config, action)
        return None

    def _lifecycle(self, action: StartInstance | Pause | Resume | Stop) -> None:
        if isinstance(action, StartInstance):
            if self.config.kernel is None:
                raise ActionError("Start microvm error: no kernel: configure a boot source first")
            self.state = VmState.RUNNING
        elif isinstance(action, Stop):
            self.state = VmState.STOPPED
        elif self.state is not VmState.STOPPED:
            self.state = VmState.PAUSED if isinstance(action, Pause) else VmState.RUNNING


    def _snapshot(self, action: CreateSnapshot | LoadSnapshot) -> None:
        """The lifecycle of snapshots without their files: paused to save, fresh to load."""
        if isinstance(action, CreateSnapshot):
            if self.state is not VmState.PAUSED:
                raise ActionError("the VM must be paused to take a snapshot (PATCH /vm with Paused)")
            return
        config = self.config
        if config.kernel is not None or config.disks or config.nets or config.vfio_devices:
            raise ActionError(SNAPSHOT_AFTER_CONFIG)
        self.state = VmState.RUNNING if action.resume_vm else VmState.PAUSED


def _configured(config: VmConfig, action: object) -> VmConfig:
    """``config`` with a configuration action applied (actions without config effect leave it)."""
    replace = msgspec.structs.replace
    if isinstance(action, ConfigureBootSource):
        return replace(config, kernel=action.kernel, initrd=action.initrd, cmdline=action.cmdline)
    if isinstance(action, ConfigureMachine):
        return _machine(config, action)
    if isinstance(action, InsertBlockDevice):
        disks = [d for d in config.disks if d.id != action.disk.id] + [action.disk]
        return replace(config, disks=tuple(disks))
    if isinstance(action, InsertNetworkDevice):
        nets = [n for n in config.nets if n.id != action.net.id] + [action.net]
        return replace(config, nets=tuple(nets))
    if isinstance(action, InsertVfioDevice):
        devices = [d for d in config.vfio_devices if d.id != action.device.id] + [action.device]
        return replace(config, vfio_devices=tuple(devices))
    if isinstance(action, UpdateBlockDevice):
        return replace(config, disks=_update_disk(config, action))
    if isinstance(action, UpdateNetworkDevice):
        return replace(config, nets=_update_net(config, action))
    if isinstance(action, SetBalloon):
        return replace(config, balloon=action.config)
    if isinstance(action, UpdateBalloon) and config.balloon is not None:
        return replace(config, balloon=replace(config.balloon, amount_mib=action.amount_mib))
    if isinstance(action, SetEntropyDevice):
        return replace(config, rng=True, rng_rate_limiter=action.rate_limiter)
    if isinstance(action, ConfigureSerial):
        serial = SerialConfig(SerialMode.FILE, action.path) if action.path else SerialConfig()
        return replace(config, serial=serial, console=action.console or config.console)
    if isinstance(action, ConfigureLogger):
        return replace(config, logger=action.logger)
    if isinstance(action, ConfigureMetrics):
        return replace(config, metrics=action.metrics)
    return config


def _machine(config: VmConfig, action: ConfigureMachine) -> VmConfig:
    changes: dict[str, object] = {}
    if action.cpus is not None:
        changes["cpus"] = action.cpus
    if action.memory_mib is not None:
        changes["memory"] = action.memory_mib << 20
    for name, value in (("smt", action.smt), ("track_dirty_pages", action.track_dirty_pages)):
        if value is not None:
            changes[name] = value
    if action.hugepages is not None:
        changes["hugepages"] = action.hugepages
    return msgspec.structs.replace(config, **changes)  # type: ignore[arg-type]


def _update_disk(config: VmConfig, action: UpdateBlockDevice) -> tuple:
    if action.drive_id not in [d.id for d in config.disks]:
        raise ActionError(f"Drive config error: no drive with id {action.drive_id}")
    return tuple(
        msgspec.structs.replace(
            d,
            path=action.path or d.path,
            rate_limiter=action.rate_limiter if action.rate_limiter is not None else d.rate_limiter,
        )
        if d.id == action.drive_id
        else d
        for d in config.disks
    )


def _update_net(config: VmConfig, action: UpdateNetworkDevice) -> tuple:
    if action.iface_id not in [n.id for n in config.nets]:
        raise ActionError(f"Network config error: no interface with id {action.iface_id}")
    return tuple(
        msgspec.structs.replace(
            n,
            rx_rate_limiter=action.rx_rate_limiter or n.rx_rate_limiter,
            tx_rate_limiter=action.tx_rate_limiter or n.tx_rate_limiter,
        )
        if n.id == action.iface_id
        else n
        for n in config.nets
    )


__all__ = ["FakeVmm"]
