"""The machine builder: the one place where KVM, memory, devices and the guest meet.

``Machine(config)`` builds: the VM, its RAM and memory slots, the in-kernel
irqchip and PIT, the platform devices on their buses, and the vCPUs with
their CPUID. ``boot_kernel()`` boots: firmware tables, the kernel and the
vCPUs' boot state (a restore will set that state from a snapshot instead).
``start()`` runs one thread per vCPU and the device event loop, ``pause()``
and ``resume()`` park and release them, and ``finish()`` returns the
:class:`StopReason` once the VM is over. Nothing else in kvmpy wires
components together.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from kvmpy.abi import kvm as abi
from kvmpy.arch.x86 import boot_cpu, layout
from kvmpy.arch.x86.acpi import build_acpi_tables, write_acpi_tables
from kvmpy.arch.x86.cpuid import CpuidEntry, build_guest_cpuid
from kvmpy.arch.x86.mptable import write_mptable
from kvmpy.arch.x86.msrs import boot_msrs
from kvmpy.bus import Bus, BusDevice
from kvmpy.devices.legacy import acpi_pm
from kvmpy.devices.legacy.acpi_pm import AcpiPm
from kvmpy.devices.legacy.debug_exit import DebugExit
from kvmpy.devices.legacy.i8042 import I8042
from kvmpy.devices.legacy.port_sinks import PostCode, QuietPorts
from kvmpy.devices.legacy.pvpanic import PvPanic
from kvmpy.devices.legacy.rtc import CmosRtc
from kvmpy.devices.legacy.serial import Uart16550
from kvmpy.errors import ConfigError, HostError
from kvmpy.kvm import System, Vcpu
from kvmpy.loader import BootMode, BootSetup, load_kernel
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.vmm.config import BalloonConfig, DiskConfig, FsConfig, NetConfig, SerialMode, VmConfig
from kvmpy.vmm.console import ConsoleOutput, ConsoleSink, FileSink
from kvmpy.vmm.event_loop import EventLoop
from kvmpy.vmm.irq import KvmIrqLine
from kvmpy.vmm.metrics_registry import MetricsRegistry
from kvmpy.vmm.metrics_sources import register_machine
from kvmpy.vmm.pci_platform import PciPlatform
from kvmpy.vmm.stop import StopKind, StopReason
from kvmpy.vmm.vcpu_thread import KICK_SIGNAL, VcpuThread, describe_registers

if TYPE_CHECKING:
    from kvmpy.virtio.devices.balloon import VirtioBalloon
    from kvmpy.virtio.devices.console import VirtioConsole
    from kvmpy.virtio.pci_transport import VirtioPciTransport
    from kvmpy.virtio.throttle import Throttle
    from kvmpy.virtio.vhost.daemon_process import DaemonProcess
    from kvmpy.virtio.vhost.user_blk import VhostUserBlock
    from kvmpy.virtio.vhost.user_fs import VhostUserFs
    from kvmpy.vmm.config import RateLimiterConfig

log = logging.getLogger("kvmpy.machine")

if TYPE_CHECKING:
    from kvmpy.vfio import Assignment

#: Opens one assigned device with guest RAM ((gpa, size, host address) each) mapped for DMA.
AssignDevice = Callable[[str, list[tuple[int, int, int]]], "Assignment"]

_T = TypeVar("_T")

#: How long ``run()`` waits for vCPU threads after a stop request.
STOP_TIMEOUT = 1.0
#: How long a pause waits for every vCPU to park, and a vCPU query for its vCPU's next exit.
PAUSE_TIMEOUT = 5.0
ON_VCPU_TIMEOUT = 5.0

# LAPIC LVT registers and delivery modes (the way firmware leaves them for the OS).
_APIC_LVT_LINT0 = 0x350
_APIC_LVT_LINT1 = 0x360
_APIC_DELIVERY_EXTINT = 0x7 << 8
_APIC_DELIVERY_NMI = 0x4 << 8
_APIC_LVT_MASKED = 1 << 16

#: Port ranges Linux probes that kvmpy answers quietly (reads all-ones, writes dropped).
QUIET_PORT_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0C0, 0x20, "dma2"),  # second DMA controller: probed by the floppy and ISA DMA code
    (0x081, 0x0F, "dma-page"),  # DMA page registers next to the POST port
    (0x0F0, 0x10, "fpu-error"),  # legacy FPU error ports
    (0x201, 0x01, "gameport"),
    (0x278, 0x03, "lpt2"),
    (0x378, 0x03, "lpt1"),
    (0x3BC, 0x03, "lpt0"),
    (0x2E8, 0x08, "com4"),
    (0x2F8, 0x08, "com2"),
    (0x3E8, 0x08, "com3"),
    (0x3F0, 0x06, "floppy"),
    (0x3C0, 0x20, "vga"),
    (0x510, 0x0C, "fw-cfg"),  # QEMU's firmware config port, probed by its driver
    (0x02E, 0x02, "superio-2e"),  # Super I/O configuration ports, probed by watchdog/hwmon drivers
    (0x04E, 0x02, "superio-4e"),
)


class Machine:
    """One VM built from a :class:`VmConfig`."""

    def __init__(
        self,
        config: VmConfig,
        *,
        serial_sink: ConsoleSink | None = None,
        memory: GuestMemory | None = None,
        assign_device: AssignDevice | None = None,
    ) -> None:
        """Build the machine (KVM objects, RAM, devices, vCPUs) without booting it.

        A failure halfway closes everything built so far: no file descriptor
        or mapping outlives a failed build. ``assign_device`` opens a --device vfio=
        (kvmpy.vfio.assign; tests give it a fake VFIO kernel).
        """
        self.config = config
        self._assign_device = assign_device
        self._resources = contextlib.ExitStack()
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self.stop_reason: StopReason | None = None
        self.threads: list[VcpuThread] = []
        self._pause_cond = threading.Condition()
        self.pause_requested = False
        self.paused = False
        #: Called (from any thread) once, with the first stop reason.
        self.on_stop: Callable[[StopReason], None] | None = None
        self._given_memory = memory
        try:
            self._build(serial_sink)
        except BaseException:
            self._resources.close()
            raise

    def _build(self, serial_sink: ConsoleSink | None) -> None:
        closing = self._resources.callback
        if self._given_memory is not None:
            closing(self._given_memory.close)  # ours from now on, even if the build fails
        self.system = System()
        closing(self.system.close)
        self.vm = self.system.create_vm()
        closing(self.vm.close)
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self._setup_platform()
        self.memory = self._setup_memory()
        if self._given_memory is None:
            closing(self.memory.close)
        self.console = ConsoleOutput(self._serial_sink(serial_sink), rate=self.config.console_rate)
        closing(self.console.flush)
        self._setup_devices()
        self.events = EventLoop()
        closing(self.events.stop)
        self.pci = PciPlatform(self.vm, self.memory, self.pio_bus, self.mmio_bus, self.events)
        #: Back-end processes kvmpy runs (qemu-storage-daemon, virtiofsd): stopped after their
        #: devices close.
        self.daemons: list[DaemonProcess] = []
        self._daemon_of: dict[str, DaemonProcess] = {}  # device id -> the daemon serving it
        closing(self._stop_daemons)
        closing(self.pci.close)
        self._setup_virtio()
        self._setup_assigned()
        self._supported_cpuid = [_to_entry(e) for e in self.system.supported_cpuid()]
        self._tsc_deadline = bool(self.system.check_extension(abi.KVM_CAP_TSC_DEADLINE_TIMER))
        self.vcpus: list[Vcpu] = []
        for index in range(self.config.cpus):
            vcpu = self.vm.create_vcpu(index)
            closing(vcpu.close)
            self.vcpus.append(vcpu)
            self._setup_cpuid(vcpu)
        #: Writes KVM buffered instead of exiting; every vCPU thread replays them before its exit.
        coalescing = self.pci.coalesced_pio or any(self._coalescing)
        self.coalesced = self.vcpus[0].coalesced_ring() if coalescing else None
        self.coalesced_lock = threading.Lock()
        self.boot: BootSetup | None = None
        #: Every counter of this machine under a stable name (vmm/metrics_sources.py names them).
        self.metrics = MetricsRegistry()
        register_machine(self.metrics, self)

    def boot_kernel(self) -> None:
        """Firmware tables, the kernel and its boot information, and every vCPU's boot state."""
        config = self.config
        assert config.kernel is not None, "validate the config before booting a machine"
        rsdp_address = self._setup_firmware()
        self.boot = load_kernel(
            self.memory,
            config.kernel,
            initrd=config.initrd,
            cmdline=config.cmdline,
            flat_address=config.flat_address,
            rsdp_address=rsdp_address,
        )
        for vcpu in self.vcpus:
            self._setup_vcpu_boot_state(vcpu)
        self._setup_boot_vcpu(self.vcpus[0], self.boot)

    # --- building -------------------------------------------------------------------
    def _setup_platform(self) -> None:
        self.vm.set_tss_address(layout.KVM_TSS_START)
        self.vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_START)
        self.vm.create_irqchip()
        self.vm.create_pit()

    def _setup_memory(self) -> GuestMemory:
        memory = self._given_memory  # a restore's memory file, mapped privately
        shared = self.config.needs_shared_memory
        if shared:
            _check_no_seccomp()
        if memory is None:
            ranges = layout.ram_ranges(self.config.memory)
            memory = GuestMemory.anonymous(ranges, hugepages=self.config.hugepages, shared=shared)
        elif shared and not memory.shared:
            raise ConfigError("a VM with a vhost-user disk or share cannot be restored from a snapshot yet")
        flags = abi.KVM_MEM_LOG_DIRTY_PAGES if self.config.track_dirty_pages else 0
        for slot, region in enumerate(memory):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address(), flags)
        self.tracking_dirty = self.config.track_dirty_pages
        if self.tracking_dirty:
            memory.track_writes()
        return memory

    def start_dirty_tracking(self) -> None:
        """Log dirty pages from now on (a migration starts it on a running VM)."""
        for slot, region in enumerate(self.memory):
            self.vm.set_user_memory_region(
                slot, region.gpa, region.size, region.host_address(), abi.KVM_MEM_LOG_DIRTY_PAGES
            )
        self.memory.track_writes()
        self.tracking_dirty = True
        self.pci.track_device_writes(True)

    def stop_dirty_tracking(self) -> None:
        """Back to untracked slots, unless the configuration asked for tracking throughout."""
        if self.config.track_dirty_pages or not self.tracking_dirty:
            return
        self.pci.track_device_writes(False)
        for slot, region in enumerate(self.memory):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address())
        self.tracking_dirty = False

    def take_dirty_pages(self) -> list[list[int]]:
        """Per RAM region, the pages written since the last call, by the guest (KVM's dirty
        log) or by the VMM (GuestMemory's record); needs dirty tracking on."""
        if not self.tracking_dirty:
            raise HostError("dirty pages are tracked only with track_dirty_pages (machine-config)")
        written = self.memory.take_written()
        pages: list[list[int]] = []
        for slot, (region, by_vmm) in enumerate(zip(self.memory, written, strict=True)):
            count = region.size // mmap.PAGESIZE
            bitmap = self.vm.get_dirty_log(slot, count)
            words = memoryview(bitmap).cast("Q")
            by_guest = {
                index * 64 + bit
                for index, word in enumerate(words)
                if word
                for bit in range(64)
                if word >> bit & 1
            }
            by_guest.update(page for page, flag in enumerate(by_vmm) if flag)
            pages.append(sorted(page for page in by_guest if page < count))
        return pages

    def _serial_sink(self, override: ConsoleSink | None) -> ConsoleSink | None:
        if override is not None:
            return override
        serial = self.config.serial
        if serial.mode is SerialMode.STDIO:
            return sys.stdout.buffer
        if serial.mode is SerialMode.FILE:
            assert serial.path is not None
            try:
                sink = FileSink(serial.path.open("ab"))  # capped at console.FILE_LIMIT
            except OSError as error:
                raise HostError(f"cannot open serial output {serial.path}: {error.strerror}") from None
            self._resources.callback(sink.close)
            return sink
        return None

    def _add_pio(self, base: int, size: int, device: BusDevice, name: str) -> None:
        self.pio_bus.register(base, size, device, name)

    def _setup_devices(self) -> None:
        self.serial = Uart16550(irq=KvmIrqLine(self.vm, layout.COM1_IRQ), output=self.console.write)
        self._add_pio(layout.COM1_PORT, 8, self.serial, "serial (COM1)")
        self._add_pio(layout.DEBUG_EXIT_PORT, 1, DebugExit(on_exit=self._debug_exit), "debug-exit")
        self.i8042 = I8042(on_reset=self._reset, irq=KvmIrqLine(self.vm, layout.I8042_KBD_IRQ))
        self._add_pio(layout.I8042_DATA_PORT, 5, self.i8042, "i8042")
        self.rtc = CmosRtc()
        self._add_pio(layout.RTC_PORT, 2, self.rtc, "rtc")
        # Writes whose effect the guest only sees at its next access to the device, which
        # exits, wait in KVM's coalesced ring instead of exiting: a byte for the 16550A's THR
        # (Linux reads LSR before each byte, and IIR after each burst from its interrupt
        # handler) and the CMOS index (the data port access follows). Half the exits of a
        # serial console; QEMU buffers the CMOS index and PCI's 0xCF8 the same way.
        self._coalescing = [
            self.vm.register_coalesced_pio(port, 1) for port in (layout.COM1_PORT, layout.RTC_PORT)
        ]
        self.acpi_pm = AcpiPm(
            on_poweroff=self._poweroff, on_reset=self._reset, irq=KvmIrqLine(self.vm, layout.ACPI_SCI_IRQ)
        )
        self._add_pio(layout.ACPI_PM1_EVENT_PORT, acpi_pm.SIZE, self.acpi_pm, "acpi-pm")
        self._add_pio(layout.PVPANIC_PORT, 1, PvPanic(on_panic=self._panic), "pvpanic")
        self._add_pio(layout.POST_CODE_PORT, 1, PostCode(), "post-code (0x80)")
        for base, size, name in QUIET_PORT_RANGES:
            self._add_pio(base, size, QuietPorts(), name)

    def _setup_virtio(self) -> None:
        # Each device model loads only when the config asks for it: every module imported
        # is start-up time, tens of times more of it in the lab's emulated CPU.
        if self.config.disks:
            from kvmpy.virtio.devices.blk import VirtioBlock
        if self.config.nets:
            from kvmpy.virtio.devices.net import VirtioNet, parse_mac
            from kvmpy.virtio.devices.tap import open_taps, queue_pairs
        slots = dict(self.config.pci_slots)
        #: drive id -> its transport (PATCH /drives reaches the device through it)
        self.disks: dict[str, VirtioPciTransport] = {}
        for number, disk in enumerate(self.config.disks):
            if disk.vhost_user:
                name = disk_device_id(number, disk.id)
                vhost = self._vhost_user_disk(disk, name)
                self.disks[disk.id or f"disk{number}"] = self.pci.add_virtio(vhost, name, slots.get(name))
                continue
            device = VirtioBlock(
                disk.path,
                read_only=disk.read_only,
                device_id=disk.id,
                direct=disk.direct,
                cache_type=disk.cache_type,
                throttle=self._throttle(disk.rate_limiter),
            )
            name = disk_device_id(number, disk.id)
            self.disks[disk.id or f"disk{number}"] = self.pci.add_virtio(device, name, slots.get(name))
        #: interface id -> its transport (PATCH /network-interfaces reaches the device through it)
        self.nets: dict[str, VirtioPciTransport] = {}
        for number, net in enumerate(self.config.nets):
            mac = parse_mac(net.mac) if net.mac else bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + number])
            name = net_device_id(number, net.id)
            taps = open_taps(net.tap, queue_pairs(net.tap, net.queues, self.config.cpus))
            if self._wants_vhost_net(net):
                from kvmpy.virtio.vhost.net import VhostNet

                kernel_nic = VhostNet(taps, mac, watch=self.events.add, unwatch=self.events.remove)
                self.nets[net.id or f"net{number}"] = self.pci.add_virtio(kernel_nic, name, slots.get(name))
                continue
            nic = VirtioNet(
                taps,
                mac,
                watch=self.events.add,
                unwatch=self.events.remove,
                rx_throttle=self._throttle(net.rx_rate_limiter),
                tx_throttle=self._throttle(net.tx_rate_limiter),
            )
            self.nets[net.id or f"net{number}"] = self.pci.add_virtio(nic, name, slots.get(name))
        for number, share in enumerate(self.config.filesystems):
            name = f"virtio-fs{number}"
            self.pci.add_virtio(self._vhost_user_fs(share, name), name, slots.get(name))
        if self.config.vsock_cid is not None:
            _check_no_seccomp("--vsock (vhost-vsock)")
            from kvmpy.virtio.vhost.vsock import VhostVsock

            vsock = VhostVsock(self.config.vsock_cid, watch=self.events.add, unwatch=self.events.remove)
            self.pci.add_virtio(vsock, "virtio-vsock", slots.get("virtio-vsock"))
        #: The virtio-balloon's transport, if the VM has one (PATCH /balloon reaches it).
        self.balloon: VirtioPciTransport | None = None
        if self.config.balloon is not None:
            self.balloon = self.pci.add_virtio(self._balloon(self.config.balloon), "virtio-balloon",
                                               slots.get("virtio-balloon"))  # fmt: skip
        if self.config.rng:
            from kvmpy.virtio.devices.rng import VirtioRng

            rng = VirtioRng(self._throttle(self.config.rng_rate_limiter))
            self.pci.add_virtio(rng, "virtio-rng", slots.get("virtio-rng"))
        self.virtio_console: VirtioConsole | None = None
        if self.config.console == "virtio":
            from kvmpy.virtio.devices.console import VirtioConsole

            self.virtio_console = VirtioConsole(self.console.write)
            self.pci.add_virtio(self.virtio_console, "virtio-console", slots.get("virtio-console"))

    def _setup_assigned(self) -> None:
        """Each --device vfio=BDF: opened with guest RAM mapped for its DMA, reset, on the bus.

        Closing runs in reverse: the function (interrupts off, BAR slots gone) before the
        device is reset and released, so it can be assigned again."""
        #: Device id -> its VFIO container, group and device (the monitor shows the IOMMU's view).
        self.assigned: dict[str, Assignment] = {}
        if not self.config.vfio_devices:
            return
        from kvmpy.vfio import assign

        opener = self._assign_device or assign
        ram = [(region.gpa, region.size, region.host_address()) for region in self.memory]
        for number, configured in enumerate(self.config.vfio_devices):
            name = configured.id or f"vfio{number}"
            assignment = opener(configured.bdf, ram)
            self._resources.callback(assignment.close)
            self.assigned[name] = assignment
            function = self.pci.add_vfio(assignment.device, name)
            self._resources.callback(function.close)
            group = assignment.group.number
            log.info("assigned %s as %s (IOMMU group %d)", assignment.bdf, name, group)

    def _vhost_user_disk(self, disk: DiskConfig, name: str) -> VhostUserBlock:
        """A disk served by qemu-storage-daemon: the one kvmpy starts, or the user's."""
        from kvmpy.virtio.vhost.user_blk import VhostUserBlock
        from kvmpy.virtio.vhost.user_client import VhostUserClient

        socket = disk.socket if disk.socket is not None else self._start_daemon(disk, name)
        client = VhostUserClient.connect(socket)
        try:
            return VhostUserBlock(client, name, watch=self.events.add, unwatch=self.events.remove)
        except BaseException:
            client.close()
            raise

    def _vhost_user_fs(self, share: FsConfig, name: str) -> VhostUserFs:
        """A share served by the virtiofsd kvmpy starts on its directory."""
        from kvmpy.virtio.vhost.user_client import VhostUserClient
        from kvmpy.virtio.vhost.user_fs import VhostUserFs
        from kvmpy.virtio.vhost.virtiofsd import Virtiofsd

        daemon = Virtiofsd(share.path, read_only=share.read_only)
        self.daemons.append(daemon)
        client = VhostUserClient.connect(daemon.socket)
        try:
            return VhostUserFs(client, name, watch=self.events.add, unwatch=self.events.remove, tag=share.tag)
        except BaseException:
            client.close()
            raise

    def _wants_vhost_net(self, net: NetConfig) -> bool:
        """vhost=on, or auto where the kernel's data plane works and nothing needs Python's."""
        from kvmpy.jail import seccomp
        from kvmpy.virtio.vhost.net import vhost_net_usable

        if net.vhost == "off":
            return False
        if net.vhost == "on":
            if seccomp.enabled():
                raise ConfigError(f"tap {net.tap}: vhost=on cannot run under --seccomp or --jail yet")
            return True
        python_only = net.rx_rate_limiter or net.tx_rate_limiter or self.config.track_dirty_pages
        return not python_only and not seccomp.enabled() and vhost_net_usable()

    def _start_daemon(self, disk: DiskConfig, name: str) -> Path:
        """qemu-storage-daemon on ``disk``'s image; returns its socket."""
        from kvmpy.virtio.vhost.storage_daemon import StorageDaemon

        daemon = StorageDaemon(
            disk.path, fmt=disk.format, read_only=disk.read_only, direct=disk.direct, aio=disk.aio
        )
        self.daemons.append(daemon)
        self._daemon_of[name] = daemon
        return daemon.socket

    def reconnect_disk(self, drive_id: str) -> None:
        """A vhost-user drive whose back end was lost gets one again: kvmpy's own daemon is
        started anew, a user's daemon is looked for at the drive's socket."""
        from kvmpy.virtio.vhost.user_client import VhostUserClient
        from kvmpy.virtio.vhost.user_device import VhostUserDevice

        transport = self.disks.get(drive_id)
        if transport is None or not isinstance(transport.device, VhostUserDevice):
            raise ConfigError(f"drive {drive_id} is not a vhost-user drive: there is nothing to reconnect")
        device = transport.device
        if device.lost is None:
            raise ConfigError(f"drive {drive_id}'s vhost-user back end is still connected")
        disks = enumerate(self.config.disks)
        number, disk = next((n, d) for n, d in disks if (d.id or f"disk{n}") == drive_id)
        name = disk_device_id(number, disk.id)
        old = self._daemon_of.pop(name, None)
        if old is not None:
            old.stop()
        socket = disk.socket if disk.socket is not None else self._start_daemon(disk, name)
        client = VhostUserClient.connect(socket)
        try:
            device.reconnect(client)
        except BaseException:
            client.close()
            raise

    def _stop_daemons(self) -> None:
        for daemon in self.daemons:
            daemon.stop()

    def _balloon(self, config: BalloonConfig) -> VirtioBalloon:
        from kvmpy.virtio.devices.balloon import PAGE, VirtioBalloon
        from kvmpy.vmm.timerfd import TimerFd

        timer = TimerFd(self.events.add) if config.stats_polling_interval_s else None
        return VirtioBalloon(
            (config.amount_mib << 20) // PAGE,
            deflate_on_oom=config.deflate_on_oom,
            stats_interval=float(config.stats_polling_interval_s),
            reporting=config.free_page_reporting,
            schedule=timer.schedule if timer else None,
            on_close=timer.close if timer else None,
        )

    def set_balloon_target(self, amount_mib: int) -> None:
        """PATCH /balloon: the driver is told the new target through a configuration change."""
        from kvmpy.virtio.devices.balloon import PAGE

        if self.balloon is None:
            raise ConfigError("this VM has no balloon (--balloon or PUT /balloon before it starts)")
        if amount_mib > self.config.memory >> 20:
            ram = self.config.memory >> 20
            raise ConfigError(f"balloon amount {amount_mib} MiB is more than the guest's {ram} MiB")
        self.balloon.device.set_target((amount_mib << 20) // PAGE)  # type: ignore[attr-defined]
        self.balloon.config_changed()

    def _throttle(self, config: RateLimiterConfig | None) -> Throttle | None:
        """A device's rate limiter if one is configured; its retries run on the event loop."""
        if config is None:
            return None
        from kvmpy.vmm.rate_limits import throttle_for  # loaded only when a limit is set

        return throttle_for(config, self.events.add)

    @property
    def console_input(self) -> Callable[[bytes], int]:
        """Where host terminal input goes: the device the console is on."""
        if self.virtio_console is not None:
            return self.virtio_console.enqueue_input
        return self.serial.enqueue_input

    def _setup_firmware(self) -> int:
        """MP table and ACPI tables; returns the RSDP address for the boot information."""
        write_mptable(self.memory, self.config.cpus)
        tables = build_acpi_tables(self.config.cpus)
        write_acpi_tables(self.memory, tables)
        return tables.rsdp_address

    def _setup_cpuid(self, vcpu: Vcpu) -> None:
        """The guest's CPUID for ``vcpu``, made from what KVM supports (part of building)."""
        guest = build_guest_cpuid(
            self._supported_cpuid, vcpu_id=vcpu.id, n_vcpus=self.config.cpus, tsc_deadline=self._tsc_deadline
        )
        vcpu.set_cpuid([_from_entry(e) for e in guest])

    def _setup_vcpu_boot_state(self, vcpu: Vcpu) -> None:
        """MSRs, FPU and LAPIC as firmware leaves them for the OS (part of booting)."""
        vcpu.set_msrs(boot_msrs())
        vcpu.set_fpu(boot_cpu.boot_fpu())
        self._setup_lapic(vcpu)

    @staticmethod
    def _setup_lapic(vcpu: Vcpu) -> None:
        """LINT0 as ExtINT (the PIC) and LINT1 as NMI, as PC firmware leaves them."""
        lapic = vcpu.get_lapic()
        registers = (ctypes.c_uint8 * ctypes.sizeof(lapic)).from_buffer(lapic)
        for offset, mode in ((_APIC_LVT_LINT0, _APIC_DELIVERY_EXTINT), (_APIC_LVT_LINT1, _APIC_DELIVERY_NMI)):
            value = struct.unpack_from("<I", registers, offset)[0]
            value = (value & ~0x700 & ~_APIC_LVT_MASKED) | mode
            struct.pack_into("<I", registers, offset, value)
        vcpu.set_lapic(lapic)

    def _setup_boot_vcpu(self, vcpu: Vcpu, boot: BootSetup) -> None:
        boot_cpu.write_gdt(self.memory)
        sregs = vcpu.get_sregs()
        if boot.mode is BootMode.PVH:
            boot_cpu.protected_mode_sregs(sregs)
            regs = boot_cpu.boot_regs(boot.entry, rbx=boot.boot_info)
        else:
            cr3 = boot_cpu.write_identity_page_tables(self.memory)
            boot_cpu.long_mode_sregs(sregs, cr3)
            regs = boot_cpu.boot_regs(boot.entry, rsi=boot.boot_info)
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)

    def replace_disk(self, drive_id: str, path: Path) -> None:
        """Drive ``drive_id`` serves ``path`` from now on; the guest's driver sees the new size."""
        transport = self.disks.get(drive_id)
        if transport is None:
            raise ConfigError(f"there is no drive {drive_id!r}")
        _not_vhost_user(transport, f"drive {drive_id}", "its image")
        transport.device.replace_backing(path)  # type: ignore[attr-defined]
        transport.config_changed()
        self._config_changed(disks=_changed(self.config.disks, drive_id, path=path))

    def set_rate_limiter(self, transport: VirtioPciTransport, side: str, config: RateLimiterConfig) -> None:
        """A running device's limits, replaced whole (Firecracker's PATCH with a rate_limiter).

        ``side`` is the device attribute: ``throttle`` (virtio-blk), ``rx_throttle`` or
        ``tx_throttle`` (virtio-net). A device that had no limit gets one.
        """
        from kvmpy.vmm.rate_limits import limiter_for

        device = transport.device
        _not_vhost_user(transport, f"device {type(device).__name__}", "its rate")
        with device.guard.lock:  # type: ignore[attr-defined]
            throttle = getattr(device, side)
            if throttle is not None:
                throttle.limiter = limiter_for(config)
            else:
                setattr(device, side, self._throttle(config))
        for drive_id, disk in self.disks.items():
            if disk is transport:
                self._config_changed(disks=_changed(self.config.disks, drive_id, rate_limiter=config))
        for iface_id, nic in self.nets.items():
            if nic is transport:
                limits = {f"{side.removesuffix('_throttle')}_rate_limiter": config}
                self._config_changed(nets=_changed(self.config.nets, iface_id, **limits))

    def _config_changed(self, **changes: Any) -> None:
        """Keep ``config`` what the machine is now: a snapshot or migration describes the
        devices from it (the image a drive serves since a PATCH, its current limits)."""
        self.config = msgspec.structs.replace(self.config, **changes)

    def send_ctrl_alt_del(self) -> None:
        """Ctrl-Alt-Del on the keyboard: the guest decides what it means (Linux: SIGINT to init)."""
        self.i8042.send_ctrl_alt_del()

    # --- device callbacks -----------------------------------------------------------
    def _debug_exit(self, code: int) -> None:
        self.request_stop(StopReason(StopKind.DEBUG_EXIT, code, f"guest wrote {code} to debug-exit"))

    def _poweroff(self) -> None:
        self.request_stop(StopReason(StopKind.POWEROFF, 0, "guest powered off (ACPI S5)"))

    def _panic(self) -> None:
        thread = threading.current_thread()
        details: tuple[str, ...] = ()
        if isinstance(thread, VcpuThread):  # device callbacks run on the vCPU that exited
            details = describe_registers(thread.vcpu)
        self.request_stop(StopReason(StopKind.GUEST_ERROR, 1, "guest kernel panicked (pvpanic)", details))

    def _reset(self) -> None:
        self.request_stop(StopReason(StopKind.RESET, 0, "guest rebooted"))

    # --- running --------------------------------------------------------------------
    def start(self, *, paused: bool = False) -> None:
        """Start the device event loop and one thread per vCPU (from the main thread).

        ``paused``: the vCPUs park before their first KVM_RUN (a restored VM
        that is not resumed yet).
        """
        _install_kick_handler()
        self.events.start()
        self.threads = [VcpuThread(self, vcpu) for vcpu in self.vcpus]
        if paused:
            self.pause_requested = True
            for thread in self.threads:
                thread.control = True
        for thread in self.threads:
            thread.start()
        if paused:
            self._wait_until_parked()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the VM has been asked to stop; True once it has."""
        return self._stopped.wait(timeout)

    def finish(self) -> StopReason:
        """After a stop: join the vCPU threads, apply the last buffered writes, stop the devices."""
        self._join_threads()
        if self.threads:  # writes buffered after the last exit: the console's last bytes
            self.threads[0].replay_coalesced()
        self.events.stop()
        self.console.flush()
        assert self.stop_reason is not None
        return self.stop_reason

    def run(self) -> StopReason:
        """Run every vCPU until the VM stops; Ctrl-C stops it too."""
        self.start()
        try:
            while not self.wait(0.25):
                pass
        except KeyboardInterrupt:
            self.request_stop(StopReason(StopKind.INTERRUPTED, 130, "interrupted from the host"))
        return self.finish()

    # --- pause and resume -------------------------------------------------------------
    def pause(self) -> None:
        """Park every vCPU outside KVM_RUN, apply buffered writes, quiesce the devices.

        Then tell the guest's kvmclock it was stopped (KVM_KVMCLOCK_CTRL), so
        Linux's watchdogs do not call the pause a soft lockup. Idempotent.
        """
        with self._pause_cond:
            if self.pause_requested:
                return
            self.pause_requested = True
        for thread in self.threads:
            thread.kick()
        self._wait_until_parked()

    def _wait_until_parked(self) -> None:
        deadline = time.monotonic() + PAUSE_TIMEOUT
        with self._pause_cond:
            while not all(t.parked or not t.is_alive() for t in self.threads):
                if time.monotonic() > deadline:
                    raise HostError(f"vCPUs did not pause within {PAUSE_TIMEOUT:.0f} s")
                self._pause_cond.wait(0.05)
                for thread in self.threads:
                    if not thread.parked and thread.is_alive():
                        thread.kick()  # it was between its check and KVM_RUN
        self.events.pause()
        self.pci.pause_devices()
        self.console.flush()  # what the guest wrote before the pause reaches its sink now
        for vcpu in self.vcpus:
            vcpu.kvmclock_ctrl()
        self.paused = True

    def park(self, thread: VcpuThread) -> None:
        """Called by a vCPU thread that saw the pause: wait here until resume or stop."""
        with self._pause_cond:
            thread.parked = True
            self._pause_cond.notify_all()
            while self.pause_requested and not thread.stopping:
                self._pause_cond.wait(0.5)
            thread.parked = False

    def resume(self) -> None:
        """Continue exactly where the pause stopped (idempotent)."""
        self.pci.resume_devices()
        self.events.resume()
        with self._pause_cond:
            self.pause_requested = False
            self.paused = False
            self._pause_cond.notify_all()

    def on_vcpu(self, index: int, work: Callable[[Vcpu], _T]) -> _T:
        """Run ``work(vcpu)`` where it may touch the vCPU's state: KVM makes vCPU ioctls
        from other threads wait while the vCPU is inside KVM_RUN.

        While the VM runs, the work runs on the vCPU's own thread at its next
        exit (it is kicked for that); while the vCPU is parked, not started or
        gone, it runs here.
        """
        if not 0 <= index < len(self.vcpus):
            raise HostError(f"there is no vCPU {index} (this VM has {len(self.vcpus)})")
        vcpu = self.vcpus[index]
        thread = self.threads[index] if index < len(self.threads) else None
        call = _VcpuCall(lambda: work(vcpu))
        if thread is None or not thread.is_alive() or thread.parked:
            call.run()
            return call.result()
        thread.call(call.run)
        deadline = time.monotonic() + ON_VCPU_TIMEOUT
        while not call.done.wait(0.02):
            if thread.parked or not thread.is_alive():
                call.run()  # no-op if the vCPU thread already took it
            elif time.monotonic() > deadline:
                raise HostError(f"vCPU {index} did not answer within {ON_VCPU_TIMEOUT:.0f} s")
        return call.result()

    # --- stopping ---------------------------------------------------------------------
    def request_stop(self, reason: StopReason) -> None:
        """Stop the VM (from any thread); the first reason given wins."""
        with self._stop_lock:
            first = self.stop_reason is None
            if first:
                self.stop_reason = reason
            for thread in self.threads:
                thread.stopping = True
                thread.control = True  # the loop looks at ``stopping`` when ``control`` is set
                thread.vcpu.set_immediate_exit(True)
            self._stopped.set()
        with self._pause_cond:
            self._pause_cond.notify_all()  # parked vCPUs see ``stopping``
        current = threading.get_ident()
        for thread in self.threads:
            if thread.ident is not None and thread.ident != current and thread.is_alive():
                signal.pthread_kill(thread.ident, KICK_SIGNAL)
        if first and self.on_stop is not None:
            self.on_stop(reason)

    def _join_threads(self) -> None:
        for thread in self.threads:
            thread.join(STOP_TIMEOUT)
            while thread.is_alive():  # it was between the check and KVM_RUN: kick again
                signal.pthread_kill(thread.ident or 0, KICK_SIGNAL)
                thread.join(0.05)

    def close(self) -> None:
        """Release everything the build took, in reverse order (safe to call twice)."""
        self._resources.close()


class _VcpuCall:
    """One piece of work for a vCPU, run exactly once by whichever thread claims it first."""

    def __init__(self, work: Callable[[], object]) -> None:
        self._work = work
        self._claim = threading.Lock()
        self._claimed = False
        self.done = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None

    def run(self) -> None:
        with self._claim:
            if self._claimed:
                return
            self._claimed = True
        try:
            self._value = self._work()
        except BaseException as error:  # handed to the caller, raised on its thread
            self._error = error
        finally:
            self.done.set()

    def result(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._value


_Item = TypeVar("_Item", DiskConfig, NetConfig)


def _changed(items: tuple[_Item, ...], item_id: str, **changes: Any) -> tuple[_Item, ...]:
    """``items`` with the one whose id (or ``disk<N>``/``net<N>`` name) is ``item_id`` changed."""
    prefix = "disk" if items and isinstance(items[0], DiskConfig) else "net"
    return tuple(
        msgspec.structs.replace(item, **changes) if (item.id or f"{prefix}{n}") == item_id else item
        for n, item in enumerate(items)
    )


def _not_vhost_user(transport: VirtioPciTransport, name: str, what: str) -> None:
    if hasattr(transport.device, "kicks_wired"):
        raise ConfigError(f"{name} has its data plane outside kvmpy (vhost): {what} is not kvmpy's to change")


def _check_no_seccomp(what: str = "vhost-user devices and shared guest memory") -> None:
    """vhost-user needs memfds, a socket with descriptors passed over it and a daemon kvmpy
    starts, kernel vhost its own ioctls: none of it is in the seccomp filters yet, so refuse
    rather than trap."""
    from kvmpy.jail import seccomp

    if seccomp.enabled():
        raise ConfigError(f"{what} cannot run under --seccomp or --jail yet (docs/security.md)")


def disk_device_id(number: int, drive_id: str) -> str:
    """A disk's device id (its snapshot section, its PCI slot's key): by drive id if it has one."""
    return f"virtio-blk:{drive_id}" if drive_id else f"virtio-blk{number}"


def net_device_id(number: int, iface_id: str) -> str:
    return f"virtio-net:{iface_id}" if iface_id else f"virtio-net{number}"


def _install_kick_handler() -> None:
    """A handler for KICK_SIGNAL so it interrupts KVM_RUN instead of killing the process."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)
    elif signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None):
        raise HostError("start the VM from the main thread (kvmpy needs a SIGUSR1 handler)")


def _to_entry(entry: abi.kvm_cpuid_entry2) -> CpuidEntry:
    return CpuidEntry(
        function=entry.function,
        index=entry.index,
        flags=entry.flags,
        eax=entry.eax,
        ebx=entry.ebx,
        ecx=entry.ecx,
        edx=entry.edx,
    )


def _from_entry(entry: CpuidEntry) -> abi.kvm_cpuid_entry2:
    return abi.kvm_cpuid_entry2(
        function=entry.function,
        index=entry.index,
        flags=entry.flags,
        eax=entry.eax,
        ebx=entry.ebx,
        ecx=entry.ecx,
        edx=entry.edx,
    )


__all__ = ["Machine"]
