"""The VMM: one per process, above the machine, for the whole life of the process.

It owns the lifecycle (see :mod:`kvmpy.vmm.lifecycle`), the configuration
being built before the start, and the current :class:`Machine`, which it
replaces when the guest reboots. Everything that changes or inspects the VM
arrives as an action (:mod:`kvmpy.vmm.actions`) on one queue, from the API
thread, the command line or a signal, and is executed in order on the thread
that calls :meth:`Vmm.run` (the main thread: KVM's kick signal needs a
handler installed there). ``submit()`` is the only entry point and is safe
from any thread.

Imports here stay light: the API server binds its socket and answers
``GET /`` before the machine's modules are loaded.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from kvmpy import __version__
from kvmpy.errors import ConfigError, HostError, KvmpyError
from kvmpy.jail import seccomp
from kvmpy.vmm import actions as a
from kvmpy.vmm.actions import ActionError, InstanceInfo, VmState, check_allowed
from kvmpy.vmm.config import (
    MAX_VCPUS,
    MIN_MEMORY,
    BalloonConfig,
    DiskConfig,
    NetConfig,
    OnReboot,
    SerialConfig,
    SerialMode,
    VmConfig,
    check_readable,
    host_memory_bytes,
)
from kvmpy.vmm.lifecycle import Event, Lifecycle
from kvmpy.vmm.stop import StopKind, StopReason

if TYPE_CHECKING:
    from kvmpy.virtio.devices.balloon import VirtioBalloon
    from kvmpy.vmm.console import ConsoleSink, InputPump
    from kvmpy.vmm.console_socket import ConsoleSocket
    from kvmpy.vmm.machine import AssignDevice, Machine
    from kvmpy.vmm.stats_report import MachineStats

log = logging.getLogger("kvmpy.vmm")

_Device = TypeVar("_Device", DiskConfig, NetConfig)

#: A guest that resets this many times in a row is stopped (a reboot loop would never end).
MAX_REBOOTS = 100
#: How often the VMM's own loop wakes without an action (periodic metrics, Ctrl-C).
TICK_SECONDS = 0.25
#: Firecracker writes metrics every minute, and on FlushMetrics.
METRICS_PERIOD = 60.0
DEFAULT_ID = "anonymous-instance"
#: Firecracker's answer to a snapshot load into a VMM that was already configured.
SNAPSHOT_AFTER_CONFIG = "Loading a microVM snapshot not allowed after configuring boot-specific resources."


@dataclass(frozen=True, slots=True)
class RunResult:
    reason: StopReason
    stats: MachineStats | None
    boots: int
    console_tail: tuple[str, ...]


class _Request:
    """An action waiting for the VMM thread, and its outcome."""

    def __init__(self, action: a.Action) -> None:
        self.action = action
        self.done = threading.Event()
        self.value: object = None
        self.error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class _MachineStopped:
    reason: StopReason
    machine: Machine


class Vmm:
    """Executes actions on one VM through its whole lifecycle."""

    def __init__(
        self,
        config: VmConfig | None = None,
        *,
        vm_id: str = DEFAULT_ID,
        serial_sink: ConsoleSink | None = None,
        stdin_fd: int | None = None,
        assign_device: AssignDevice | None = None,
    ) -> None:
        """``assign_device`` opens each VFIO device for the machines this VMM builds
        (None: kvmpy.vfio.assign on the host's kernel; tests give it a fake one)."""
        self.id = vm_id
        self.config = config if config is not None else VmConfig()
        self.lifecycle = Lifecycle()
        self.machine: Machine | None = None
        self.boots = 0
        self._serial_sink = serial_sink
        self._stdin_fd = stdin_fd
        self._assign_device = assign_device
        self._queue: queue.Queue[_Request | _MachineStopped] = queue.Queue()
        #: The thread that executes actions: the one that built the Vmm and then calls run().
        self._thread_ident = threading.get_ident()
        self._started_at = time.monotonic()
        self._closed = False
        self._result: RunResult | None = None
        self._pump: InputPump | None = None
        self._console_socket: ConsoleSocket | None = None
        self._last_stats: MachineStats | None = None
        self._console_tail: tuple[str, ...] = ()
        self._metrics: Any = None
        self._next_metrics = 0.0
        #: The current or last migration's progress, as plain data (replaced, never mutated).
        self._migration: dict[str, object] | None = None
        #: This thread's seccomp filter is the VMM role's (see _enter_vmm_role).
        self._in_vmm_role = False
        #: Set from a signal handler (SIGTERM); the loop's next tick stops the VM.
        self.terminate_requested = False
        self.interrupt_requested = False

    @property
    def state(self) -> VmState:
        return self.lifecycle.state

    # --- the entry point --------------------------------------------------------------
    def submit(self, action: a.Action) -> object:
        """Execute ``action`` on the VMM thread and return its result (any thread).

        Raises ActionError if the action is refused or fails.
        """
        if type(action) in a.IMMEDIATE:
            return self._answer_now(action)
        if threading.get_ident() == self._thread_ident:
            return self._execute(action)
        if self._closed:
            raise ActionError("the VMM has stopped")
        request = _Request(action)
        self._queue.put(request)
        while not request.done.wait(0.5):
            if self._closed:
                raise ActionError("the VMM stopped before the request was carried out")
        if request.error is not None:
            raise request.error
        return request.value

    def run(self) -> RunResult:
        """Serve actions on this thread until the VM stops; returns why it stopped.

        On the main thread, SIGTERM stops the VM the way Ctrl-C does (status 143).
        """
        self._thread_ident = threading.get_ident()
        previous = self._handle_signals()
        try:
            while self.state is not VmState.STOPPED:
                try:
                    self._serve_one()
                    self._check_signals()
                except KeyboardInterrupt:  # raised where no handler of ours was installed
                    self._stop_from_host(StopReason(StopKind.INTERRUPTED, 130, "interrupted from the host"))
        finally:
            self._shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        assert self._result is not None
        return self._result

    def _handle_signals(self) -> dict[int, Any]:
        """SIGTERM and SIGINT (Ctrl-C) only set a flag that this loop looks at: Python's own
        SIGINT handler raises KeyboardInterrupt wherever the main thread is, and raised inside
        ``queue.get`` it could leave the queue's lock held, so that the stop the loop then makes
        (which puts the machine's end on that queue) hung the VMM for good."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def terminate(signum: int, frame: object) -> None:
            self.terminate_requested = True  # only a flag: the handler may interrupt any code

        def interrupt(signum: int, frame: object) -> None:
            self.interrupt_requested = True

        return {
            signal.SIGTERM: signal.signal(signal.SIGTERM, terminate),
            signal.SIGINT: signal.signal(signal.SIGINT, interrupt),
        }

    def _check_signals(self) -> None:
        if self.state is VmState.STOPPED:
            return
        if self.interrupt_requested:
            self.interrupt_requested = False
            self._stop_from_host(StopReason(StopKind.INTERRUPTED, 130, "interrupted from the host"))
        if self.terminate_requested:
            self.terminate_requested = False
            self._stop_from_host(StopReason(StopKind.INTERRUPTED, 143, "terminated (SIGTERM)"))

    def _serve_one(self) -> None:
        try:
            item = self._queue.get(timeout=TICK_SECONDS)
        except queue.Empty:
            self._tick()
            return
        if isinstance(item, _MachineStopped):
            self._machine_stopped(item)
            return
        try:
            item.value = self._execute(item.action)
        except Exception as error:  # handed to the submitting thread
            item.error = error if isinstance(error, ActionError) else _as_action_error(error)
        finally:
            item.done.set()

    def _answer_now(self, action: a.Action) -> object:
        """An immediate query (see actions.IMMEDIATE): plain state, read without the queue."""
        if isinstance(action, a.GetInstanceInfo):
            return InstanceInfo(self.id, self.state, __version__)
        return self._migration_status()

    def _migration_status(self) -> dict[str, object]:
        progress = self._migration
        if progress is None:
            return {"state": "none"}
        return dict(progress)

    def _tick(self) -> None:
        if self._metrics is not None and time.monotonic() >= self._next_metrics:
            self._write_metrics()

    # --- executing actions ------------------------------------------------------------
    def _execute(self, action: a.Action) -> object:
        if self.state is VmState.STOPPED:
            raise ActionError("the VM has stopped")
        check_allowed(action, self.lifecycle.started)
        handler = self._handlers().get(type(action))
        if handler is None:
            return self._inspect(action)
        return handler(action)

    def _handlers(self) -> dict[type, Callable[[Any], object]]:
        return {
            a.ConfigureBootSource: self._configure_boot_source,
            a.ConfigureMachine: self._configure_machine,
            a.InsertBlockDevice: self._insert_block_device,
            a.UpdateBlockDevice: self._update_block_device,
            a.InsertNetworkDevice: self._insert_network_device,
            a.UpdateNetworkDevice: self._update_network_device,
            a.InsertVfioDevice: self._insert_vfio_device,
            a.SetEntropyDevice: self._set_entropy_device,
            a.SetBalloon: lambda action: self._update(balloon=action.config),
            a.UpdateBalloon: self._update_balloon,
            a.UpdateBalloonStatistics: self._update_balloon_statistics,
            a.GetBalloon: lambda _: self._balloon_config(),
            a.GetBalloonStatistics: lambda _: self._balloon_statistics(),
            a.ConfigureSerial: self._configure_serial,
            a.ConfigureLogger: self._configure_logger,
            a.ConfigureMetrics: self._configure_metrics,
            a.StartInstance: lambda _: self._start(),
            a.SendCtrlAltDel: lambda _: self._send_ctrl_alt_del(),
            a.FlushMetrics: lambda _: self._flush_metrics(),
            a.Pause: lambda _: self._pause(),
            a.Resume: lambda _: self._resume(),
            a.CreateSnapshot: self._create_snapshot,
            a.LoadSnapshot: self._load_snapshot,
            a.Migrate: self._migrate,
            a.IncomingMigration: self._incoming,
            a.Stop: lambda action: self._stop_from_host(StopReason(StopKind.STOPPED, 0, action.reason)),
            a.GetInstanceInfo: lambda _: InstanceInfo(self.id, self.state, __version__),
            a.GetVmConfig: lambda _: self.config,
            a.GetMigrationStatus: lambda _: self._migration_status(),
        }

    def _update(self, **changes: Any) -> None:
        self.config = msgspec.structs.replace(self.config, **changes)

    # configuration
    def _configure_boot_source(self, action: a.ConfigureBootSource) -> None:
        _check_file(action.kernel, "kernel image")
        if action.initrd is not None:
            _check_file(action.initrd, "initrd")
        self._update(kernel=action.kernel, initrd=action.initrd, cmdline=action.cmdline)

    def _configure_machine(self, action: a.ConfigureMachine) -> None:
        defaults = VmConfig()
        current = self.config if action.partial else defaults

        def pick(value: Any, old: Any) -> Any:
            return old if value is None else value

        cpus = pick(action.cpus, self.config.cpus if action.partial else None)
        memory_mib = pick(action.memory_mib, self.config.memory >> 20 if action.partial else None)
        if cpus is None or memory_mib is None:
            raise ConfigError("vcpu_count and mem_size_mib are required")
        smt = pick(action.smt, current.smt)
        if not 1 <= cpus <= MAX_VCPUS or smt and cpus > 1 and cpus % 2:
            rule = f"1 to {MAX_VCPUS}" + (", and 1 or even with SMT" if smt else "")
            raise ConfigError(f"The vCPU number is invalid! vcpu_count {cpus}: use {rule}")
        if memory_mib * (1 << 20) < MIN_MEMORY:
            raise ConfigError(f"The memory size (MiB) is invalid: at least {MIN_MEMORY >> 20} MiB")
        self._update(
            cpus=cpus,
            memory=memory_mib << 20,
            smt=smt,
            track_dirty_pages=pick(action.track_dirty_pages, current.track_dirty_pages),
            hugepages=pick(action.hugepages, current.hugepages),
        )

    def _insert_block_device(self, action: a.InsertBlockDevice) -> None:
        disk = action.disk
        if disk.socket is None:
            _check_file(disk.path, f"drive {disk.id}")
        else:
            disk.check_usable()
        others = [d for d in self.config.disks if d.id != disk.id]
        if disk.is_root_device and any(d.is_root_device for d in others):
            raise ActionError("A root block device already exists!")
        replaced = [disk if d.id == disk.id else d for d in self.config.disks]
        disks = replaced if len(others) < len(self.config.disks) else [*self.config.disks, disk]
        # The root drive is the guest's first disk (/dev/vda), as Firecracker orders it.
        disks.sort(key=lambda d: not d.is_root_device)
        self._update(disks=tuple(disks))

    def _update_block_device(self, action: a.UpdateBlockDevice) -> None:
        """PATCH /drives after boot: a new backing file, which the guest sees with its new size."""
        assert self.machine is not None
        if not any(d.id == action.drive_id for d in self.config.disks):
            raise ActionError(f"Invalid block device ID: {action.drive_id}")
        if action.rate_limiter is not None:
            transport = self.machine.disks[action.drive_id]
            self.machine.set_rate_limiter(transport, "throttle", action.rate_limiter)
            self._update(disks=_changed(self.config.disks, action.drive_id, rate_limiter=action.rate_limiter))
        if action.path is not None:
            _check_file(action.path, f"drive {action.drive_id}")
            self.machine.replace_disk(action.drive_id, action.path)
            self._update(disks=_changed(self.config.disks, action.drive_id, path=action.path))
        if action.reconnect:
            self.machine.reconnect_disk(action.drive_id)

    def _insert_network_device(self, action: a.InsertNetworkDevice) -> None:
        net = action.net
        others = [n for n in self.config.nets if n.id != net.id]
        for other in others:
            if other.tap == net.tap:
                raise ActionError(f"The host device name {net.tap} is already in use by {other.id}")
            if net.mac and other.mac.lower() == net.mac.lower():
                raise ActionError(f"The guest MAC address {net.mac} is already in use.")
        if len(others) < len(self.config.nets):
            nets = tuple(net if n.id == net.id else n for n in self.config.nets)
        else:
            nets = (*self.config.nets, net)
        self._update(nets=nets)

    def _update_network_device(self, action: a.UpdateNetworkDevice) -> None:
        """PATCH /network-interfaces after boot: new rate limiters, each side replaced whole."""
        assert self.machine is not None
        if not any(n.id == action.iface_id for n in self.config.nets):
            raise ActionError(f"Invalid network interface ID: {action.iface_id}")
        transport = self.machine.nets[action.iface_id]
        changes: dict[str, object] = {}
        for side, limiter in (("rx", action.rx_rate_limiter), ("tx", action.tx_rate_limiter)):
            if limiter is not None:
                self.machine.set_rate_limiter(transport, f"{side}_throttle", limiter)
                changes[f"{side}_rate_limiter"] = limiter
        self._update(nets=_changed(self.config.nets, action.iface_id, **changes))

    def _insert_vfio_device(self, action: a.InsertVfioDevice) -> None:
        """Add the device, or replace the one with its id; a host device goes to one id only."""
        device = action.device
        for other in self.config.vfio_devices:
            if other.id != device.id and other.bdf == device.bdf:
                raise ActionError(f"The host PCI device {device.bdf} is already assigned as {other.id}.")
        if any(d.id == device.id for d in self.config.vfio_devices):
            devices = tuple(device if d.id == device.id else d for d in self.config.vfio_devices)
        else:
            devices = (*self.config.vfio_devices, device)
        self._update(vfio_devices=devices)

    # the balloon
    def _balloon_config(self) -> BalloonConfig:
        if self.config.balloon is None:
            raise ActionError("No balloon device configured (PUT /balloon before the VM starts).")
        return self.config.balloon

    def _machine_balloon(self) -> VirtioBalloon:
        config = self._balloon_config()
        assert self.machine is not None and self.machine.balloon is not None, config
        return self.machine.balloon.device  # type: ignore[return-value]

    def _balloon_statistics(self) -> dict[str, int]:
        if not self._balloon_config().stats_polling_interval_s:
            raise ActionError("Balloon statistics are not enabled (stats_polling_interval_s is 0).")
        return self._machine_balloon().statistics()

    def _update_balloon(self, action: a.UpdateBalloon) -> None:
        config = self._balloon_config()
        assert self.machine is not None
        self.machine.set_balloon_target(action.amount_mib)
        self._update(balloon=msgspec.structs.replace(config, amount_mib=action.amount_mib))

    def _update_balloon_statistics(self, action: a.UpdateBalloonStatistics) -> None:
        config = self._balloon_config()
        seconds = action.stats_polling_interval_s
        if (seconds == 0) != (config.stats_polling_interval_s == 0):
            raise ActionError("Statistics cannot be turned on or off after the VM has started.")
        self._machine_balloon().stats_interval = float(seconds)
        self._update(balloon=msgspec.structs.replace(config, stats_polling_interval_s=seconds))

    def _set_entropy_device(self, action: a.SetEntropyDevice) -> None:
        self._update(rng=True, rng_rate_limiter=action.rate_limiter)

    def _configure_serial(self, action: a.ConfigureSerial) -> None:
        serial = SerialConfig(SerialMode.FILE, action.path) if action.path else SerialConfig(SerialMode.STDIO)
        if action.console is not None and action.console not in ("serial", "virtio"):
            raise ConfigError(f"invalid console {action.console!r}: use serial or virtio")
        self._update(serial=serial, console=action.console or self.config.console)

    def _configure_logger(self, action: a.ConfigureLogger) -> None:
        from kvmpy.vmm.log_output import configure_logger

        configure_logger(action.logger)
        self._update(logger=action.logger)

    def _configure_metrics(self, action: a.ConfigureMetrics) -> None:
        from kvmpy.vmm.metrics import MetricsWriter

        if self._metrics is not None:
            raise ActionError("Reinitialization of metrics not allowed.")
        self._metrics = MetricsWriter(action.metrics.path)
        self._next_metrics = time.monotonic() + METRICS_PERIOD
        self._update(metrics=action.metrics)

    # lifecycle
    def _start(self) -> None:
        next_state = self.lifecycle.next_state(Event.START)
        self.config.validate(host_memory_bytes())
        self._open_console()
        self._boot_machine()
        self.lifecycle.state = next_state
        self._enter_vmm_role()
        self._start_input()

    def _boot_machine(self) -> None:
        """Build, boot and start a machine from the configuration (a failure leaves none)."""
        from kvmpy.vmm.machine import Machine

        machine = Machine(
            _effective(self.config), serial_sink=self._serial_sink, assign_device=self._assign_device
        )
        try:
            machine.boot_kernel()
            machine.on_stop = lambda reason: self._queue.put(_MachineStopped(reason, machine))
            machine.start()
        except BaseException:
            machine.close()
            raise
        self.machine = machine
        self.boots += 1
        self._started_at = time.monotonic()

    def _enter_vmm_role(self) -> None:
        """The machine runs: this thread narrows its seccomp filter to the VMM role (once).

        From here on this thread cannot run a vCPU or create a VM, which is why a
        VMM with seccomp ends at a guest reboot instead of building a new machine.
        """
        if not self._in_vmm_role:
            self._in_vmm_role = True
            seccomp.enter_role(seccomp.Role.VMM)

    def _pause(self) -> None:
        assert self.machine is not None
        next_state = self.lifecycle.next_state(Event.PAUSE)
        self.machine.pause()
        self.lifecycle.state = next_state

    def _resume(self) -> None:
        assert self.machine is not None
        next_state = self.lifecycle.next_state(Event.RESUME)
        self.machine.resume()
        self.lifecycle.state = next_state

    # snapshots
    def _configured_for_boot(self) -> bool:
        """Boot-specific resources were configured: a snapshot or a migration cannot take their place."""
        config = self.config
        return config.kernel is not None or bool(config.disks or config.nets or config.vfio_devices)

    def _create_snapshot(self, action: a.CreateSnapshot) -> None:
        from kvmpy.state.machine_state import save_machine, write_memory_file
        from kvmpy.state.snapshot_file import write_state_file

        assert self.machine is not None
        if self.state is not VmState.PAUSED:
            raise ActionError("the VM must be paused to take a snapshot (PATCH /vm with Paused)")
        if action.snapshot_type not in ("Full", "Diff"):
            raise ActionError(f"snapshot_type {action.snapshot_type!r}: use Full or Diff")
        tracking = self.machine.config.track_dirty_pages
        if action.snapshot_type == "Diff" and not tracking:
            raise ActionError("Diff snapshots need track_dirty_pages set in the machine configuration")
        started = time.monotonic()
        sections = save_machine(self.machine)
        # Dirty pages are taken at every snapshot, so a Diff holds what changed since the last one.
        dirty = self.machine.take_dirty_pages() if tracking else None
        pages = dirty if action.snapshot_type == "Diff" else None
        memory_bytes = write_memory_file(self.machine, action.mem_file_path, pages)
        state_bytes = write_state_file(action.snapshot_path, sections)
        log.info(
            "snapshot: %d bytes of state, %d MiB of memory written in %.0f ms",
            state_bytes, memory_bytes >> 20, (time.monotonic() - started) * 1000,
        )

    def _load_snapshot(self, action: a.LoadSnapshot) -> None:
        """Become the snapshotted VM; a load that fails ends this VMM (as Firecracker's does)."""
        if self._configured_for_boot():
            raise ActionError(SNAPSHOT_AFTER_CONFIG)
        next_state = self.lifecycle.next_state(Event.RESTORE)
        try:
            self._restore_machine(action)
        except KvmpyError as error:
            self.lifecycle.apply(Event.STOP)
            reason = StopReason(StopKind.HOST_ERROR, 1, f"loading the snapshot failed: {error}")
            self._result = RunResult(reason, None, self.boots, ())
            kind = ConfigError if isinstance(error, ConfigError) else HostError
            raise kind(f"Load snapshot error: {error}") from None
        self.lifecycle.state = next_state
        self._enter_vmm_role()
        self._start_input()
        if action.resume_vm:
            self._resume()

    def _restore_machine(self, action: a.LoadSnapshot) -> None:
        from kvmpy.memory.guest_memory import GuestMemory
        from kvmpy.state.machine_state import (
            check_memory_file,
            config_for_restore,
            read_description,
            restore_machine,
        )
        from kvmpy.state.snapshot_file import read_state_file
        from kvmpy.vmm.machine import Machine

        sections = read_state_file(action.snapshot_path)
        described = read_description(sections)
        check_memory_file(action.mem_file_path, described)
        ranges = [(r.gpa, r.size, r.offset) for r in described.regions]
        try:
            memory = GuestMemory.from_file(str(action.mem_file_path), ranges)
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot map the memory file {action.mem_file_path}: {error}") from None
        self.config = config_for_restore(
            described, self.config.serial, action.track_dirty_pages, action.network_overrides
        )
        self._open_console()
        machine = Machine(self.config, serial_sink=self._serial_sink, memory=memory)
        try:
            restore_machine(machine, sections, action.clock_realtime)
            machine.on_stop = lambda reason: self._queue.put(_MachineStopped(reason, machine))
            machine.start(paused=True)
        except BaseException:
            machine.close()
            raise
        self.machine = machine
        self.boots += 1
        self._started_at = time.monotonic()

    # live migration
    def _migrate(self, action: a.Migrate) -> dict[str, object]:
        from kvmpy.state.migration_sender import MigrationLimits, MigrationReport, migrate

        assert self.machine is not None
        if self.state is not VmState.RUNNING:
            raise ActionError("only a running VM migrates (resume it first)")
        if action.on_limit not in ("pause", "cancel"):
            raise ActionError(f"on_limit {action.on_limit!r}: use pause or cancel")
        limits = MigrationLimits(action.downtime_ms / 1000, action.max_rounds, on_limit=action.on_limit)
        total_pages = self.machine.memory.total_size // 4096
        started = time.monotonic()

        def progress(report: MigrationReport, pages_this_round: int) -> None:
            self._migration = {
                "state": "active",
                "destination": action.destination,
                "round": report.rounds,
                "pages_this_round": pages_this_round,
                "pages_sent": report.pages_sent + pages_this_round,
                "guest_pages": total_pages,
                "bytes_sent": report.bytes_sent,
                "seconds": time.monotonic() - started,
            }

        self._migration = {"state": "active", "destination": action.destination, "round": 0}
        try:
            report = migrate(self.machine, action.destination, limits, progress)
        except KvmpyError as error:
            self._migration = {"state": "failed", "destination": action.destination, "error": str(error)}
            raise
        downtime = f"{report.downtime_seconds * 1000:.0f} ms" if report.downtime_seconds is not None else "?"
        message = (
            f"migrated to {action.destination}: {report.rounds} rounds, {report.bytes_sent >> 20} MiB, "
            f"{report.total_seconds:.2f} s, downtime {downtime}"
        )
        log.warning("%s", message)
        # Stopped while still paused: the vCPUs leave their park without running the guest
        # again, so nothing happens here that the destination does not know about.
        self.machine.request_stop(StopReason(StopKind.STOPPED, 0, message))
        self._migration = {
            "state": "completed",
            "destination": action.destination,
            "rounds": report.rounds,
            "round_pages": report.round_pages,
            "pages_sent": report.pages_sent,
            "bytes_sent": report.bytes_sent,
            "total_seconds": report.total_seconds,
            "downtime_seconds": report.downtime_seconds,
            "note": report.note,
        }
        return dict(self._migration)

    def _incoming(self, action: a.IncomingMigration) -> None:
        """Become the VM a source sends; a failure ends this VMM (nothing half migrated runs)."""
        from kvmpy.state import migration_receiver

        if self._configured_for_boot():
            raise ActionError(SNAPSHOT_AFTER_CONFIG)
        next_state = self.lifecycle.next_state(Event.RESTORE)
        listener, text = migration_receiver.listen(action.address)
        try:
            self._open_console()
            machine = migration_receiver.receive(listener, text, self.config.serial, self._serial_sink)
        except KvmpyError as error:
            self.lifecycle.apply(Event.STOP)
            reason = StopReason(StopKind.HOST_ERROR, 1, f"incoming migration failed: {error}")
            self._result = RunResult(reason, None, self.boots, ())
            raise
        machine.on_stop = lambda reason: self._queue.put(_MachineStopped(reason, machine))
        self.machine = machine
        self.config = machine.config
        self.boots += 1
        self._started_at = time.monotonic()
        self.lifecycle.state = next_state
        self.lifecycle.apply(Event.RESUME)
        self._enter_vmm_role()
        self._start_input()

    def _send_ctrl_alt_del(self) -> None:
        assert self.machine is not None
        if self.state is VmState.PAUSED:
            raise ActionError("the VM is paused: resume it before sending Ctrl-Alt-Del")
        self.machine.send_ctrl_alt_del()

    def _stop_from_host(self, reason: StopReason) -> None:
        """Stop the VM from the host side; the stop completes through _machine_stopped."""
        if self.machine is None:
            self.lifecycle.apply(Event.STOP)
            self._result = RunResult(reason, self._last_stats, self.boots, self._console_tail)
            return
        self.machine.request_stop(reason)  # parked vCPUs see it and leave without running

    def _machine_stopped(self, event: _MachineStopped) -> None:
        machine = event.machine
        if machine is not self.machine:
            return
        reason = machine.finish()
        self._retire(machine)
        rebooting = reason.kind is StopKind.RESET and self.config.on_reboot is OnReboot.RESTART
        if rebooting and seccomp.enabled():
            log.warning("the guest rebooted: with seccomp a reboot ends the VMM (no new vCPUs from here)")
            rebooting = False
        if rebooting and self.boots <= MAX_REBOOTS:
            try:
                self._boot_machine()
                self.lifecycle.apply(Event.REBOOT)
                return
            except KvmpyError as error:
                reason = StopReason(StopKind.HOST_ERROR, 1, f"cannot reboot the VM: {error}")
        self.lifecycle.apply(Event.STOP)
        self._result = RunResult(reason, self._last_stats, self.boots, self._console_tail)

    def _retire(self, machine: Machine) -> None:
        """Keep what reports need from a stopped machine, then release it."""
        from kvmpy.vmm.stats_report import collect

        self._last_stats = collect(
            time.monotonic() - self._started_at,
            [thread.stats for thread in machine.threads],
            machine.pio_bus,
            machine.mmio_bus,
            machine.metrics.snapshot(),
        )
        self._console_tail = tuple(machine.console.last_lines())
        if self._metrics is not None:
            self._write_metrics()
        machine.close()
        self.machine = None

    # --- console ----------------------------------------------------------------------
    def _open_console(self) -> None:
        """A Unix-socket console waits for its client before the first boot."""
        serial = self.config.serial
        if serial.mode is SerialMode.UNIX and self._serial_sink is None and self._console_socket is None:
            assert serial.path is not None
            from kvmpy.vmm.console_socket import ConsoleSocket

            self._console_socket = ConsoleSocket(serial.path)
            self._serial_sink, self._stdin_fd = self._console_socket.accept()

    def _start_input(self) -> None:
        if self._stdin_fd is None or self._pump is not None:
            return
        from kvmpy.vmm.console import InputPump

        self._pump = InputPump(self._stdin_fd, self._deliver_input)
        self._pump.start()

    def _deliver_input(self, data: bytes) -> int:
        """Host input to the current machine's console (held while paused or rebooting)."""
        machine = self.machine
        if machine is None or machine.paused:
            return 0
        return machine.console_input(data)

    # --- monitor and metrics ----------------------------------------------------------
    def _inspect(self, action: a.Action) -> object:
        if self.machine is None:
            raise ActionError("there is no running machine to inspect")
        from kvmpy.vmm.inspect import answer

        try:
            return answer(self.machine, action, vm_state=self.state.value, started_at=self._started_at)
        except ActionError:
            raise
        except KvmpyError as error:
            raise ActionError(str(error)) from None

    def _flush_metrics(self) -> None:
        if self._metrics is None:
            raise ActionError("metrics are not configured: PUT /metrics first")
        self._write_metrics()

    def write_metrics_now(self) -> None:
        """Write the metrics file if metrics are configured (the seccomp trap's last words; any thread)."""
        if self._metrics is not None:
            self._write_metrics()

    def _write_metrics(self) -> None:
        from kvmpy.vmm.metrics import collect_metrics

        self._metrics.write(collect_metrics(self))
        self._next_metrics = time.monotonic() + METRICS_PERIOD

    # --- the end ----------------------------------------------------------------------
    def _shutdown(self) -> None:
        machine = self.machine
        if machine is not None:  # an exception left the loop: do not leave a VM behind
            machine.request_stop(StopReason(StopKind.HOST_ERROR, 1, "the VMM stopped"))
            machine.finish()
            self._retire(machine)
        if self._result is None:
            self._result = RunResult(
                StopReason(StopKind.HOST_ERROR, 1, "the VMM stopped"), self._last_stats, self.boots,
                self._console_tail,
            )
        if self._pump is not None:
            self._pump.stop()
            self._pump.join(1.0)
        if self._console_socket is not None:
            self._console_socket.close()
        if self._metrics is not None:
            self._metrics.close()
        self._closed = True
        while True:  # requests that arrived too late
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Request):
                item.error = ActionError("the VM has stopped")
                item.done.set()


def _effective(config: VmConfig) -> VmConfig:
    """The configuration a machine is built from: the root drive on the command line."""
    root = next((d for d in config.disks if d.is_root_device), None)
    if root is None:
        return config
    mode = "ro" if root.read_only else "rw"
    device = f"PARTUUID={root.partuuid}" if root.partuuid else "/dev/vda"
    return msgspec.structs.replace(config, cmdline=f"{config.cmdline} root={device} {mode}".strip())


def _changed(items: tuple[_Device, ...], device_id: str, **changes: Any) -> tuple[_Device, ...]:
    """``items`` with the one whose id is ``device_id`` changed."""
    return tuple(msgspec.structs.replace(item, **changes) if item.id == device_id else item for item in items)


def _check_file(path: Path, what: str) -> None:
    """Firecracker checks files when they are configured, not only at the start."""
    check_readable(path, what)


def _as_action_error(error: BaseException) -> ActionError:
    """A host error while carrying out an action, as the message the client gets."""
    if isinstance(error, KvmpyError):
        return ActionError(str(error))
    log.error("internal error while executing an action", exc_info=error)
    return ActionError(f"internal error: {error!r}")


__all__ = ["DEFAULT_ID", "RunResult", "Vmm"]
