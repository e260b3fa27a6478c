"""PCI bus 0 and the virtio devices on it, wired to KVM (ioeventfd, irqfd) and the event loop.

This is the builder's helper for everything PCI: it places each function's
BARs in the layout's window, registers the configuration mechanisms, and
whenever the guest maps a virtio notify area, binds an ioeventfd per queue
so that a queue kick never reaches Python on the vCPU thread.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable

from kvmpy.arch.x86 import layout
from kvmpy.bus import Bus
from kvmpy.devices.pci.host_bridge import HostBridge
from kvmpy.devices.pci.root import ConfigMechanism1, Ecam, PciRoot
from kvmpy.kvm import MsiRoute, Vm
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.virtio.device import VirtioDevice
from kvmpy.virtio.pci_transport import BAR0_SIZE, VirtioPciTransport
from kvmpy.vmm.event_loop import EventFd, EventLoop
from kvmpy.vmm.msi import IrqfdMsiSender, MsiRouter

log = logging.getLogger("kvmpy.pci")


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
        self._senders: list[IrqfdMsiSender] = []
        self._notifiers: dict[int, list[tuple[int, int, EventFd]]] = {}
        self._intx_lock = threading.Lock()
        self._intx_holders: dict[int, int] = {}  # GSI -> functions holding INTx high

    def add_virtio(self, device: VirtioDevice, name: str) -> VirtioPciTransport:
        slot = len(self.transports) + 1
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
        self.root.add(transport, slot=slot, name=name)
        return transport

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
        transport = self.transports[slot - 1]
        wired = []
        for address, length, queue in areas:
            eventfd = EventFd()
            self._vm.register_ioeventfd(eventfd.fd, address, length, pio=False)
            self._events.add(eventfd.fd, _kick_handler(eventfd, transport, queue))
            wired.append((address, length, eventfd))
        self._notifiers[slot] = wired

    def close(self) -> None:
        for wired in self._notifiers.values():
            for _, _, eventfd in wired:
                eventfd.close()
        for sender in self._senders:
            sender.close()
        for transport in self.transports:
            close = getattr(transport.device, "close", None)
            if close is not None:
                close()


def _kick_handler(eventfd: EventFd, transport: VirtioPciTransport, queue: int) -> Callable[[], None]:
    def kicked() -> None:
        eventfd.drain()
        transport.notify(queue)

    return kicked


__all__ = ["PciPlatform"]
