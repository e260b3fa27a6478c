"""A KVM virtual machine: memory slots, interrupt controllers, eventfds."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmpy.abi import kvm as abi
from kvmpy.kvm.ioctl import ioctl
from kvmpy.kvm.vcpu import Vcpu

if TYPE_CHECKING:
    from kvmpy.kvm.system import System


@dataclass(frozen=True, slots=True)
class MsiRoute:
    """A GSI routed to an MSI message (address/data as the guest programmed it)."""

    gsi: int
    address: int
    data: int


@dataclass(frozen=True, slots=True)
class MemorySlot:
    """A memory slot as it was given to KVM (KVM has no ioctl that reads them back)."""

    slot: int
    guest_phys_addr: int
    size: int
    host_address: int
    #: KVM_MEM_LOG_DIRTY_PAGES, KVM_MEM_READONLY.
    flags: int


@dataclass(frozen=True, slots=True)
class IrqchipRoute:
    """A GSI routed to a pin of the in-kernel PIC or IOAPIC."""

    gsi: int
    irqchip: int
    pin: int


class Vm:
    """One KVM VM file descriptor and the operations on it."""

    def __init__(self, fd: int, system: System) -> None:
        self.fd = fd
        self.system = system
        self._vcpu_mmap_size = system.vcpu_mmap_size()
        #: Every memory slot currently registered, by slot number.
        self.memory_slots: dict[int, MemorySlot] = {}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_extension(self, capability: int) -> int:
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, capability, name="KVM_CHECK_EXTENSION")

    # --- memory ---------------------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_address: int, flags: int = 0
    ) -> None:
        """Map ``size`` bytes of host memory at ``host_address`` into the guest at ``guest_phys_addr``."""
        region = abi.kvm_userspace_memory_region(
            slot=slot,
            flags=flags,
            guest_phys_addr=guest_phys_addr,
            memory_size=size,
            userspace_addr=host_address,
        )
        ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region, name="KVM_SET_USER_MEMORY_REGION")
        if size == 0:  # a slot of size 0 deletes it
            self.memory_slots.pop(slot, None)
        else:
            self.memory_slots[slot] = MemorySlot(slot, guest_phys_addr, size, host_address, flags)

    def get_dirty_log(self, slot: int, pages: int) -> bytes:
        """The dirty-page bitmap of ``slot`` since the last call (needs KVM_MEM_LOG_DIRTY_PAGES)."""
        bitmap = ctypes.create_string_buffer(((pages + 63) // 64) * 8)
        log = abi.kvm_dirty_log(slot=slot)
        log.dirty_bitmap = ctypes.cast(bitmap, ctypes.c_void_p).value
        ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, log, name="KVM_GET_DIRTY_LOG")
        return bitmap.raw

    def set_tss_address(self, address: int) -> None:
        ioctl(self.fd, abi.KVM_SET_TSS_ADDR, address, name="KVM_SET_TSS_ADDR")

    def set_identity_map_address(self, address: int) -> None:
        value = ctypes.c_uint64(address)
        ioctl(self.fd, abi.KVM_SET_IDENTITY_MAP_ADDR, value, name="KVM_SET_IDENTITY_MAP_ADDR")

    # --- interrupts -------------------------------------------------------------------
    def create_irqchip(self) -> None:
        """In-kernel PIC, IOAPIC and per-vCPU local APICs."""
        ioctl(self.fd, abi.KVM_CREATE_IRQCHIP, 0, name="KVM_CREATE_IRQCHIP")

    def create_pit(self) -> None:
        """In-kernel i8254 PIT; the speaker port (0x61) stays with userspace."""
        config = abi.kvm_pit_config(flags=abi.KVM_PIT_SPEAKER_DUMMY)
        ioctl(self.fd, abi.KVM_CREATE_PIT2, config, name="KVM_CREATE_PIT2")

    def get_irqchip(self, chip_id: int) -> abi.kvm_irqchip:
        """The state of one in-kernel interrupt controller (KVM_GET_IRQCHIP): chip_id is
        KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE or KVM_IRQCHIP_IOAPIC."""
        chip = abi.kvm_irqchip(chip_id=chip_id)
        ioctl(self.fd, abi.KVM_GET_IRQCHIP, chip, name="KVM_GET_IRQCHIP")
        return chip

    def set_irqchip(self, chip: abi.kvm_irqchip) -> None:
        ioctl(self.fd, abi.KVM_SET_IRQCHIP, chip, name="KVM_SET_IRQCHIP")

    def get_pit2(self) -> abi.kvm_pit_state2:
        pit = abi.kvm_pit_state2()
        ioctl(self.fd, abi.KVM_GET_PIT2, pit, name="KVM_GET_PIT2")
        return pit

    def set_pit2(self, pit: abi.kvm_pit_state2) -> None:
        ioctl(self.fd, abi.KVM_SET_PIT2, pit, name="KVM_SET_PIT2")

    def get_clock(self) -> abi.kvm_clock_data:
        """kvmclock's time base for the whole VM (nanoseconds since the VM started, roughly)."""
        clock = abi.kvm_clock_data()
        ioctl(self.fd, abi.KVM_GET_CLOCK, clock, name="KVM_GET_CLOCK")
        return clock

    def set_clock(self, clock: abi.kvm_clock_data) -> None:
        ioctl(self.fd, abi.KVM_SET_CLOCK, clock, name="KVM_SET_CLOCK")

    def set_irq_line(self, irq: int, level: bool) -> None:
        """Drive GSI ``irq`` of the in-kernel irqchip high or low."""
        line = abi.kvm_irq_level(irq=irq, level=int(level))
        ioctl(self.fd, abi.KVM_IRQ_LINE, line, name="KVM_IRQ_LINE")

    def register_irqfd(self, eventfd: int, gsi: int, resample_fd: int | None = None) -> None:
        """Writes to ``eventfd`` raise ``gsi`` inside the kernel, without a trip through Python."""
        irqfd = abi.kvm_irqfd(fd=eventfd, gsi=gsi)
        if resample_fd is not None:
            irqfd.flags = abi.KVM_IRQFD_FLAG_RESAMPLE
            irqfd.resamplefd = resample_fd
        ioctl(self.fd, abi.KVM_IRQFD, irqfd, name="KVM_IRQFD")

    def unregister_irqfd(self, eventfd: int, gsi: int) -> None:
        irqfd = abi.kvm_irqfd(fd=eventfd, gsi=gsi, flags=abi.KVM_IRQFD_FLAG_DEASSIGN)
        ioctl(self.fd, abi.KVM_IRQFD, irqfd, name="KVM_IRQFD")

    def register_ioeventfd(
        self,
        eventfd: int,
        address: int,
        length: int,
        *,
        pio: bool,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        """Guest writes to ``address`` signal ``eventfd`` in the kernel: no exit to userspace."""
        flags = 0
        if pio:
            flags |= abi.KVM_IOEVENTFD_FLAG_PIO
        if datamatch is not None:
            flags |= abi.KVM_IOEVENTFD_FLAG_DATAMATCH
        if deassign:
            flags |= abi.KVM_IOEVENTFD_FLAG_DEASSIGN
        event = abi.kvm_ioeventfd(datamatch=datamatch or 0, addr=address, len=length, fd=eventfd, flags=flags)
        ioctl(self.fd, abi.KVM_IOEVENTFD, event, name="KVM_IOEVENTFD")

    def register_coalesced_pio(self, port: int, size: int) -> bool:
        """Buffer guest writes to ports ``port..port+size-1`` in the coalesced ring instead of
        exiting (see :mod:`kvmpy.kvm.coalesced_ring`); False where KVM cannot."""
        if not self.check_extension(abi.KVM_CAP_COALESCED_PIO):
            return False
        zone = abi.kvm_coalesced_mmio_zone(addr=port, size=size, pio=1)
        ioctl(self.fd, abi.KVM_REGISTER_COALESCED_MMIO, zone, name="KVM_REGISTER_COALESCED_MMIO")
        return True

    def set_gsi_routing(self, routes: Sequence[MsiRoute | IrqchipRoute]) -> None:
        """Replace the whole GSI routing table."""
        table = abi.make_irq_routing(len(routes))
        table.nr = len(routes)
        for i, route in enumerate(routes):
            entry = table.entries[i]
            entry.gsi = route.gsi
            if isinstance(route, MsiRoute):
                entry.type = abi.KVM_IRQ_ROUTING_MSI
                entry.u.msi.address_lo = route.address & 0xFFFF_FFFF
                entry.u.msi.address_hi = route.address >> 32
                entry.u.msi.data = route.data
            else:
                entry.type = abi.KVM_IRQ_ROUTING_IRQCHIP
                entry.u.irqchip.irqchip = route.irqchip
                entry.u.irqchip.pin = route.pin
        ioctl(self.fd, abi.KVM_SET_GSI_ROUTING, table, name="KVM_SET_GSI_ROUTING")

    def signal_msi(self, address: int, data: int) -> int:
        msi = abi.kvm_msi(address_lo=address & 0xFFFF_FFFF, address_hi=address >> 32, data=data)
        return ioctl(self.fd, abi.KVM_SIGNAL_MSI, msi, name="KVM_SIGNAL_MSI")

    # --- vCPUs ------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id: int) -> Vcpu:
        fd = ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id, name="KVM_CREATE_VCPU")
        return Vcpu(fd, vcpu_id, self._vcpu_mmap_size)


__all__ = ["IrqchipRoute", "MemorySlot", "MsiRoute", "Vm"]
