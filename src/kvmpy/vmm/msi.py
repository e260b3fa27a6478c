"""MSI delivery through KVM: one GSI and irqfd per MSI-X vector, routes kept in step.

Each vector of each device gets a GSI routed (KVM_SET_GSI_ROUTING) to the
message the guest programmed, and an eventfd bound to that GSI with
KVM_IRQFD: raising the interrupt is one eventfd write, and the kernel does
the rest. Setting the routing table replaces it whole, so the default
routes of the in-kernel PIC and IOAPIC pins are always included.
"""

from __future__ import annotations

import threading

from kvmpy.kvm import IrqchipRoute, MsiRoute, Vm
from kvmpy.vmm.event_loop import EventFd

IOAPIC_PINS = 24
FIRST_MSI_GSI = IOAPIC_PINS
PIC_MASTER, PIC_SLAVE, IOAPIC = 0, 1, 2


def default_routes() -> list[IrqchipRoute]:
    """KVM's built-in routing: GSIs 0-15 to the PICs, 0-23 to the IOAPIC (GSI 2 only to the IOAPIC)."""
    routes = []
    for gsi in range(16):
        if gsi != 2:
            routes.append(IrqchipRoute(gsi, PIC_MASTER if gsi < 8 else PIC_SLAVE, gsi % 8))
    for gsi in range(IOAPIC_PINS):
        routes.append(IrqchipRoute(gsi, IOAPIC, gsi))
    return routes


class MsiRouter:
    """Owns the GSI routing table for all MSI senders of a VM."""

    def __init__(self, vm: Vm) -> None:
        self._vm = vm
        self._lock = threading.Lock()
        self._routes: dict[int, MsiRoute] = {}
        self._next_gsi = FIRST_MSI_GSI

    def allocate(self) -> tuple[int, EventFd]:
        with self._lock:
            gsi = self._next_gsi
            self._next_gsi += 1
        eventfd = EventFd()
        self._vm.register_irqfd(eventfd.fd, gsi)
        return gsi, eventfd

    def routes(self) -> list[MsiRoute]:
        """The MSI routes installed now, by GSI (for the monitor)."""
        with self._lock:
            return sorted(self._routes.values(), key=lambda route: route.gsi)

    def route(self, gsi: int, address: int, data: int) -> None:
        with self._lock:
            route = MsiRoute(gsi, address, data)
            if self._routes.get(gsi) == route:
                return
            self._routes[gsi] = route
            table: list[MsiRoute | IrqchipRoute] = [*default_routes(), *self._routes.values()]
            self._vm.set_gsi_routing(table)


class IrqfdMsiSender:
    """An MsiSender for one device: vector -> (GSI, eventfd)."""

    def __init__(self, router: MsiRouter, vectors: int) -> None:
        self._router = router
        self._vectors = [router.allocate() for _ in range(vectors)]
        self.sent = 0

    def changed(self, vector: int, address: int, data: int) -> None:
        if 0 <= vector < len(self._vectors) and address:
            self._router.route(self._vectors[vector][0], address, data)

    def send(self, vector: int, address: int, data: int) -> None:
        if not 0 <= vector < len(self._vectors):
            return
        gsi, eventfd = self._vectors[vector]
        self._router.route(gsi, address, data)
        self.sent += 1
        eventfd.signal()

    def irqfd(self, vector: int) -> int | None:
        """The eventfd bound to ``vector``'s GSI: writing it raises the interrupt in KVM."""
        return self._vectors[vector][1].fd if 0 <= vector < len(self._vectors) else None

    def close(self) -> None:
        for _, eventfd in self._vectors:
            eventfd.close()


__all__ = ["IrqfdMsiSender", "MsiRouter", "default_routes"]
