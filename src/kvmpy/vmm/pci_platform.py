"""PCI bus 0 and the virtio devices on it, wired to KVM (ioeventfd, irqfd) and the event loop.

This is the builder's helper for everything PCI: it places each function's
BARs in the layout's window, registers the configuration mechanisms, and
whenever the guest maps a virtio notify area, binds an ioeventfd per queue
so that a queue kick never reaches Python on the vCPU thread.

Each virtio function has a device id (its name) and a slot; a restore gives
every id the slot it had (``VmConfig.pci_slots``), so the guest finds each
device where it left it whatever order the devices were configured in.

Assigned (VFIO) functions get their BARs from the layout's window for them, KVM memory
slots for the parts of those BARs that can be mapped, an irqfd per MSI-X vector and one
with a resample fd for INTx: all handed to the device model as callbacks.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmpy.abi import vfio as abi_vfio
from kvmpy.arch.x86 import layout
from kvmpy.bus import Bus
from kvmpy.devices.pci.config_space import INTERRUPT_LINE, INTERRUPT_PIN, Bar
from kvmpy.devices.pci.host_bridge import HostBridge
from kvmpy.devices.pci.root import MAX_SLOTS, ConfigMechanism1, Ecam, PciRoot
from kvmpy.errors import ConfigError
from kvmpy.kvm import MsiRoute, Vm
from kvmpy.kvm.errors import KvmError
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.ratelimit import guest_log
from kvmpy.virtio.device import VirtioDevice
from kvmpy.virtio.pci_transport import BAR0_SIZE, VirtioPciTransport
from kvmpy.vmm.event_loop import EventFd, EventLoop
from kvmpy.vmm.msi import IrqfdMsiSender, MsiRouter

log = logging.getLogger("kvmpy.pci")

#: KVM memory slots for assigned devices' BARs start here (guest RAM has the first few).
FIRST_DEVICE_MEMORY_SLOT = 64
PAGE = 4096

if TYPE_CHECKING:
    from kvmpy.devices.vfio import AssignedFunction
    from kvmpy.vfio import VfioDevice


class AssignedBarAllocator:
    """Addresses for assigned functions' BARs, largest first, naturally aligned: memory BARs
    in the layout's window for them, I/O BARs in its port range for them."""

    def __init__(self) -> None:
        self._next_address = layout.PCI_ASSIGNED_BARS_START
        self._next_port = layout.PCI_ASSIGNED_IO_START

    def place(self, bdf: str, bars: list[Bar | None]) -> dict[int, int]:
        placed = {}
        for bar in sorted((bar for bar in bars if bar is not None), key=lambda bar: -bar.size):
            placed[bar.index] = self._port(bdf, bar) if bar.is_io else self._address(bdf, bar)
        return placed

    def _address(self, bdf: str, bar: Bar) -> int:
        alignment = max(bar.size, PAGE)
        address = (self._next_address + alignment - 1) & ~(alignment - 1)
        if address + bar.size > layout.PCI_ASSIGNED_BARS_END:
            window = (layout.PCI_ASSIGNED_BARS_END - layout.PCI_ASSIGNED_BARS_START) >> 20
            raise ConfigError(
                f"vfio={bdf}: BAR{bar.index} ({bar.size >> 10} KiB) does not fit in kvmpy's {window} MiB"
                " window for assigned devices' BARs"
            )
        self._next_address = address + max(bar.size, PAGE)
        return address

    def _port(self, bdf: str, bar: Bar) -> int:
        port = (self._next_port + bar.size - 1) & ~(bar.size - 1)
        if port + bar.size > layout.PCI_ASSIGNED_IO_END:
            ports = layout.PCI_ASSIGNED_IO_END - layout.PCI_ASSIGNED_IO_START
            raise ConfigError(
                f"vfio={bdf}: BAR{bar.index} ({bar.size} ports) does not fit in kvmpy's {ports} ports"
                " for assigned devices' I/O BARs"
            )
        self._next_port = port + bar.size
        return port


class PciPlatform:
    def __init__(self, vm: Vm, memory: GuestMemory, pio_bus: Bus, mmio_bus: Bus, events: EventLoop) -> None:
        self._vm = vm
        self._memory = memory
        self._events = events
        self.root = PciRoot(pio_bus, mmio_bus, memory.is_ram)
        pio_bus.register(layout.PCI_CONFIG_ADDRESS_PORT, 8, ConfigMechanism1(self.root), "pci-config (0xcf8)")
        # Writes to the address latch only matter at the next data-port access, which exits:
        # buffered in KVM's coalesced ring, they halve the exits of every configuration access.
        self.coalesced_pio = vm.register_coalesced_pio(layout.PCI_CONFIG_ADDRESS_PORT, 4)
        mmio_bus.register(layout.PCI_ECAM_START, layout.PCI_ECAM_SIZE, Ecam(self.root), "pci-ecam")
        self.root.add(HostBridge(), slot=0, name="host-bridge")
        self._router = MsiRouter(vm)
        self.transports: list[VirtioPciTransport] = []
        #: Device id -> its transport, and slot -> its transport.
        self.by_id: dict[str, VirtioPciTransport] = {}
        self._by_slot: dict[int, VirtioPciTransport] = {}
        self._senders: list[IrqfdMsiSender] = []
        self._notifiers: dict[int, list[tuple[int, int, EventFd]]] = {}
        self._intx_lock = threading.Lock()
        self._intx_holders: dict[int, int] = {}  # GSI -> functions holding INTx high
        #: Device id -> assigned (VFIO) function.
        self.assigned: dict[str, AssignedFunction] = {}
        self._assigned_bars = AssignedBarAllocator()
        self._free_memory_slots: list[int] = []
        self._next_memory_slot = FIRST_DEVICE_MEMORY_SLOT

    def _free_slot(self, name: str, slot: int | None) -> int:
        if name in self.by_id or name in self.assigned:
            raise ConfigError(f"two PCI devices have the id {name!r}")
        if slot is None:
            free = [s for s in range(1, MAX_SLOTS) if self.root.slots[s] is None]
            if not free:
                raise ConfigError(f"no free PCI slot for {name}: kvmpy's bus has {MAX_SLOTS - 1}")
            return free[0]
        if not 1 <= slot < MAX_SLOTS or self.root.slots[slot] is not None:
            raise ConfigError(f"PCI slot {slot} for {name} is not a free slot (1 to {MAX_SLOTS - 1})")
        return slot

    def add_virtio(self, device: VirtioDevice, name: str, slot: int | None = None) -> VirtioPciTransport:
        """Add ``device`` as ``name`` (its device id) in ``slot``, or in the first free one."""
        slot = self._free_slot(name, slot)
        window = layout.pci_bar_window(slot)
        sender = IrqfdMsiSender(self._router, len(device.queue_sizes) + 1)
        transport = VirtioPciTransport(
            device,
            self._memory,
            sender,
            bar0_address=window,
            bar1_address=window + BAR0_SIZE,
            wire_notify=functools.partial(self._wire, slot),
            intx=functools.partial(self._set_intx, layout.pci_intx_gsi(slot, 0)),
            interrupt_line=layout.pci_intx_gsi(slot, 0),
        )
        self._senders.append(sender)
        self.transports.append(transport)
        self.by_id[name] = transport
        self._by_slot[slot] = transport
        self.root.add(transport, slot=slot, name=name)
        return transport

    def add_vfio(self, device: VfioDevice, name: str, slot: int | None = None) -> AssignedFunction:
        """Put the assigned ``device`` on the bus as ``name``; the caller releases the device
        after closing the function this returns."""
        from kvmpy.devices.vfio import AssignedFunction

        slot = self._free_slot(name, slot)
        pin = device.read(abi_vfio.VFIO_PCI_CONFIG_REGION_INDEX, INTERRUPT_PIN, 1)[0]
        function = AssignedFunction(
            device,
            functools.partial(self._assigned_bars.place, device.bdf),
            self._sender,
            self._map_device_memory,
            self._unmap_device_memory,
            self._events.add,
            self._events.remove,
            functools.partial(self._bind_intx, layout.pci_intx_gsi(slot, max(pin, 1) - 1)),
        )
        if 1 <= pin <= 4:
            function.config.set_raw(INTERRUPT_LINE, bytes([layout.pci_intx_gsi(slot, pin - 1)]))
        self.assigned[name] = function
        self.root.add(function, slot=slot, name=name)
        return function

    def _sender(self, vectors: int) -> IrqfdMsiSender:
        sender = IrqfdMsiSender(self._router, vectors)
        self._senders.append(sender)
        return sender

    def _map_device_memory(self, gpa: int, size: int, host_address: int) -> object:
        """A KVM memory slot for part of an assigned BAR: the guest's MMIO there does not exit.

        Only inside the PCI window: elsewhere (the guest moved the BAR onto the APIC page or
        KVM's own pages) or if KVM refuses, no slot, and the accesses exit and are forwarded."""
        inside = gpa >= layout.PCI_MMIO32_START and gpa + size <= layout.PCI_MMIO32_END
        if not inside:
            message = "assigned BAR part at %#x+%#x is outside the PCI window: its accesses will exit"
            guest_log.warning(log, ("bar-slot-window", gpa), message, gpa, size)
            return None
        if self._free_memory_slots:
            number = self._free_memory_slots.pop()
        else:
            number, self._next_memory_slot = self._next_memory_slot, self._next_memory_slot + 1
        try:
            self._vm.set_user_memory_region(number, gpa, size, host_address)
        except KvmError as error:
            self._free_memory_slots.append(number)
            message = "no memory slot at %#x: %s; its accesses exit"
            guest_log.warning(log, ("bar-slot", gpa), message, gpa, error)
            return None
        return number

    def _unmap_device_memory(self, handle: object) -> None:
        if handle is None:
            return
        assert isinstance(handle, int)
        self._vm.set_user_memory_region(handle, 0, 0, 0)
        self._free_memory_slots.append(handle)

    def _bind_intx(self, gsi: int, trigger: int, resample: int) -> Callable[[], None]:
        """An irqfd on the function's INTx GSI with a resample fd: the guest's EOI reaches VFIO,
        which unmasks the device's line, without kvmpy."""
        self._vm.register_irqfd(trigger, gsi, resample_fd=resample)
        return functools.partial(self._vm.unregister_irqfd, trigger, gsi)

    def slots(self) -> dict[str, int]:
        """Device id -> slot, for the machine description a snapshot carries."""
        return {name: self.root.slot_of(transport) for name, transport in self.by_id.items()}

    def place_restored_bars(self) -> None:
        """Map every function's BARs (and so its notify ioeventfds) where its restored
        configuration space puts them."""
        for slot in sorted(self._by_slot):
            self.root.refresh(slot)

    def msi_routes(self) -> list[MsiRoute]:
        """The MSI routes the guest's MSI-X programming has installed in KVM, by GSI."""
        return self._router.routes()

    def _set_intx(self, gsi: int, level: bool) -> None:
        """A function's INTx changed: the shared, level-triggered pin is high while any holds it."""
        with self._intx_lock:
            held = self._intx_holders.get(gsi, 0) + (1 if level else -1)
            self._intx_holders[gsi] = max(held, 0)
            self._vm.set_irq_line(gsi, self._intx_holders[gsi] > 0)

    def _wire(self, slot: int, areas: list[tuple[int, int, int]]) -> None:
        """Replace slot's ioeventfds with one per notify register in ``areas``."""
        for address, length, eventfd in self._notifiers.pop(slot, []):
            self._events.remove(eventfd.fd)
            self._vm.register_ioeventfd(eventfd.fd, address, length, pio=False, deassign=True)
            eventfd.close()
        transport = self._by_slot[slot]
        # A device whose queues a back end serves (vhost-user) takes the kicks as they are:
        # the back end waits on the ioeventfds, and Python never sees a kick.
        kicks_wired = getattr(transport.device, "kicks_wired", None)
        wired = []
        for address, length, queue in areas:
            eventfd = EventFd()
            self._vm.register_ioeventfd(eventfd.fd, address, length, pio=False)
            if kicks_wired is None:
                self._events.add(eventfd.fd, _kick_handler(eventfd, transport, queue))
            wired.append((address, length, eventfd))
        self._notifiers[slot] = wired
        if kicks_wired is not None:
            kicks_wired({area[2]: fd.fd for (_, _, fd), area in zip(wired, areas, strict=True)})

    def pause_devices(self) -> None:
        """The VM paused: a device whose data plane runs outside kvmpy (vhost) stops it."""
        self._tell_devices("pause")

    def resume_devices(self) -> None:
        self._tell_devices("resume")

    def track_device_writes(self, tracking: bool) -> None:
        """Dirty tracking started or stopped: a data plane whose writes to guest memory no log
        records hands its queues to kvmpy's own meanwhile."""
        self._tell_devices("track_writes", tracking)

    def _tell_devices(self, hook: str, *args: object) -> None:
        for transport in self.transports:
            call = getattr(transport.device, hook, None)
            if call is not None:  # under the device's lock; its guest errors mark it broken
                transport.device.guard.run(functools.partial(call, *args))

    def close(self) -> None:
        for transport in self.transports:  # first: a device may still watch its kicks
            close = getattr(transport.device, "close", None)
            if close is not None:
                close()
        for wired in self._notifiers.values():
            for _, _, eventfd in wired:
                eventfd.close()
        for sender in self._senders:
            sender.close()


def _kick_handler(eventfd: EventFd, transport: VirtioPciTransport, queue: int) -> Callable[[], None]:
    def kicked() -> None:
        eventfd.drain()
        transport.notify(queue)

    return kicked


__all__ = ["PciPlatform"]
