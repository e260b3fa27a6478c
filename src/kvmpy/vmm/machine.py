"""The machine builder: the one place where KVM, memory, devices and the guest meet.

``Machine(config)`` creates the VM, its RAM and memory slots, the in-kernel
irqchip and PIT, the platform devices on their buses, the firmware tables,
loads the kernel and prepares every vCPU. ``run()`` starts one thread per
vCPU and returns a :class:`StopReason` once the VM is over. Nothing else in
kvmpy wires components together.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import struct
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

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
from kvmpy.errors import HostError
from kvmpy.kvm import System, Vcpu
from kvmpy.loader import BootMode, BootSetup, load_kernel
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.vmm.config import SerialMode, VmConfig
from kvmpy.vmm.console import ConsoleOutput, ConsoleSink, FileSink
from kvmpy.vmm.event_loop import EventLoop
from kvmpy.vmm.irq import KvmIrqLine
from kvmpy.vmm.pci_platform import PciPlatform
from kvmpy.vmm.stop import StopKind, StopReason
from kvmpy.vmm.vcpu_thread import VcpuThread, describe_registers

if TYPE_CHECKING:
    from kvmpy.virtio.devices.console import VirtioConsole
    from kvmpy.virtio.throttle import Throttle
    from kvmpy.vmm.config import RateLimiterConfig

log = logging.getLogger("kvmpy.machine")

_T = TypeVar("_T")

#: The signal that kicks a vCPU thread out of KVM_RUN.
KICK_SIGNAL = signal.SIGUSR1
#: How long ``run()`` waits for vCPU threads after a stop request.
STOP_TIMEOUT = 1.0

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

    def __init__(self, config: VmConfig, *, serial_sink: ConsoleSink | None = None) -> None:
        self.config = config
        self.system = System()
        self.vm = self.system.create_vm()
        self.pio_bus = Bus("pio")
        self.mmio_bus = Bus("mmio")
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self.stop_reason: StopReason | None = None
        self.threads: list[VcpuThread] = []
        self._setup_platform()
        self.memory = self._setup_memory()
        self.console = ConsoleOutput(self._serial_sink(serial_sink))
        self._setup_devices()
        self.events = EventLoop()
        self.pci = PciPlatform(self.vm, self.memory, self.pio_bus, self.mmio_bus, self.events)
        self._setup_virtio()
        self.rsdp_address = self._setup_firmware()
        assert config.kernel is not None, "validate the config before building a machine"
        self.boot = load_kernel(
            self.memory,
            config.kernel,
            initrd=config.initrd,
            cmdline=config.cmdline,
            flat_address=config.flat_address,
            rsdp_address=self.rsdp_address,
        )
        supported = [_to_entry(e) for e in self.system.supported_cpuid()]
        tsc_deadline = bool(self.system.check_extension(abi.KVM_CAP_TSC_DEADLINE_TIMER))
        self.vcpus = [self._setup_vcpu(i, supported, tsc_deadline) for i in range(config.cpus)]
        #: Writes KVM buffered instead of exiting; every vCPU thread replays them before its exit.
        coalescing = self.pci.coalesced_pio or any(self._coalescing)
        self.coalesced = self.vcpus[0].coalesced_ring() if coalescing else None
        self.coalesced_lock = threading.Lock()
        self._setup_boot_vcpu(self.vcpus[0], self.boot)

    # --- building -------------------------------------------------------------------
    def _setup_platform(self) -> None:
        self.vm.set_tss_address(layout.KVM_TSS_START)
        self.vm.set_identity_map_address(layout.KVM_IDENTITY_MAP_START)
        self.vm.create_irqchip()
        self.vm.create_pit()

    def _setup_memory(self) -> GuestMemory:
        memory = GuestMemory.anonymous(layout.ram_ranges(self.config.memory), hugepages=self.config.hugepages)
        for slot, region in enumerate(memory):
            self.vm.set_user_memory_region(slot, region.gpa, region.size, region.host_address())
        return memory

    def _serial_sink(self, override: ConsoleSink | None) -> ConsoleSink | None:
        if override is not None:
            return override
        serial = self.config.serial
        if serial.mode is SerialMode.STDIO:
            return sys.stdout.buffer
        if serial.mode is SerialMode.FILE:
            assert serial.path is not None
            try:
                return FileSink(serial.path.open("ab"))  # capped at console.FILE_LIMIT
            except OSError as error:
                raise HostError(f"cannot open serial output {serial.path}: {error.strerror}") from None
        return None

    def _add_pio(self, base: int, size: int, device: BusDevice, name: str) -> None:
        self.pio_bus.register(base, size, device, name)

    def _setup_devices(self) -> None:
        self.serial = Uart16550(irq=KvmIrqLine(self.vm, layout.COM1_IRQ), output=self.console.write)
        self._add_pio(layout.COM1_PORT, 8, self.serial, "serial (COM1)")
        self._add_pio(layout.DEBUG_EXIT_PORT, 1, DebugExit(on_exit=self._debug_exit), "debug-exit")
        self._add_pio(layout.I8042_DATA_PORT, 5, I8042(on_reset=self._reset), "i8042")
        self._add_pio(layout.RTC_PORT, 2, CmosRtc(), "rtc")
        # Writes whose effect the guest only sees at its next access to the device, which
        # exits, wait in KVM's coalesced ring instead of exiting: a byte for the 16550A's THR
        # (Linux reads LSR before each byte, and IIR after each burst from its interrupt
        # handler) and the CMOS index (the data port access follows). Half the exits of a
        # serial console; QEMU buffers the CMOS index and PCI's 0xCF8 the same way.
        self._coalescing = [
            self.vm.register_coalesced_pio(port, 1) for port in (layout.COM1_PORT, layout.RTC_PORT)
        ]
        self._add_pio(
            layout.ACPI_PM1_EVENT_PORT,
            acpi_pm.SIZE,
            AcpiPm(
                on_poweroff=self._poweroff, on_reset=self._reset, irq=KvmIrqLine(self.vm, layout.ACPI_SCI_IRQ)
            ),
            "acpi-pm",
        )
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
            from kvmpy.virtio.devices.tap import Tap
        for number, disk in enumerate(self.config.disks):
            device = VirtioBlock(
                disk.path,
                read_only=disk.read_only,
                device_id=disk.id,
                direct=disk.direct,
                cache_type=disk.cache_type,
                throttle=self._throttle(disk.rate_limiter),
            )
            self.pci.add_virtio(device, f"virtio-blk{number}")
        for number, net in enumerate(self.config.nets):
            mac = parse_mac(net.mac) if net.mac else bytes([0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + number])
            nic = VirtioNet(
                Tap(net.tap),
                mac,
                watch=self.events.add,
                unwatch=self.events.remove,
                rx_throttle=self._throttle(net.rx_rate_limiter),
                tx_throttle=self._throttle(net.tx_rate_limiter),
            )
            self.pci.add_virtio(nic, f"virtio-net{number}")
        if self.config.rng:
            from kvmpy.virtio.devices.rng import VirtioRng

            self.pci.add_virtio(VirtioRng(self._throttle(self.config.rng_rate_limiter)), "virtio-rng")
        self.virtio_console: VirtioConsole | None = None
        if self.config.console == "virtio":
            from kvmpy.virtio.devices.console import VirtioConsole

            self.virtio_console = VirtioConsole(self.console.write)
            self.pci.add_virtio(self.virtio_console, "virtio-console")

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

    def _setup_vcpu(self, index: int, supported: list[CpuidEntry], tsc_deadline: bool) -> Vcpu:
        """vCPU ``index`` with its CPUID made from KVM's ``supported`` one, MSRs, FPU and LAPIC."""
        vcpu = self.vm.create_vcpu(index)
        guest = build_guest_cpuid(
            supported, vcpu_id=index, n_vcpus=self.config.cpus, tsc_deadline=tsc_deadline
        )
        vcpu.set_cpuid([_from_entry(e) for e in guest])
        vcpu.set_msrs(boot_msrs())
        vcpu.set_fpu(boot_cpu.boot_fpu())
        self._setup_lapic(vcpu)
        return vcpu

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
    def run(self) -> StopReason:
        """Run every vCPU until the VM stops; Ctrl-C stops it too."""
        _install_kick_handler()
        self.events.start()
        self.threads = [VcpuThread(self, vcpu) for vcpu in self.vcpus]
        for thread in self.threads:
            thread.start()
        try:
            while not self._stopped.wait(0.25):
                pass
        except KeyboardInterrupt:
            self.request_stop(StopReason(StopKind.INTERRUPTED, 130, "interrupted from the host"))
        self._join_threads()
        if self.threads:  # writes buffered after the last exit: the console's last bytes
            self.threads[0].replay_coalesced()
        self.events.stop()
        self.console.flush()
        assert self.stop_reason is not None
        return self.stop_reason

    def on_vcpu(self, index: int, work: Callable[[Vcpu], _T]) -> _T:
        """Run ``work(vcpu)`` where it may touch the vCPU's state: KVM refuses vCPU ioctls
        from other threads while the vCPU is inside KVM_RUN (they wait for its next exit).

        Until the vCPU threads run (and once they are parked or gone) ``work`` runs here.
        """
        if not 0 <= index < len(self.vcpus):
            raise HostError(f"there is no vCPU {index} (this VM has {len(self.vcpus)})")
        return work(self.vcpus[index])

    def request_stop(self, reason: StopReason) -> None:
        """Stop the VM (from any thread); the first reason given wins."""
        with self._stop_lock:
            if self.stop_reason is None:
                self.stop_reason = reason
            for thread in self.threads:
                thread.stopping = True
                thread.vcpu.set_immediate_exit(True)
            self._stopped.set()
        current = threading.get_ident()
        for thread in self.threads:
            if thread.ident is not None and thread.ident != current and thread.is_alive():
                signal.pthread_kill(thread.ident, KICK_SIGNAL)

    def _join_threads(self) -> None:
        for thread in self.threads:
            thread.join(STOP_TIMEOUT)
            while thread.is_alive():  # it was between the check and KVM_RUN: kick again
                signal.pthread_kill(thread.ident or 0, KICK_SIGNAL)
                thread.join(0.05)

    def close(self) -> None:
        self.pci.close()
        for vcpu in self.vcpus:
            vcpu.close()
        self.vm.close()
        self.system.close()
        self.memory.close()


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
