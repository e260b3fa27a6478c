"""ACPI fixed hardware: the PM1a event and control blocks and the PM timer.

The FADT points Linux here. Writing SLP_EN with SLP_TYP = S5 to the PM1
control register is how ``poweroff`` ends a VM; the PM timer is a 24-bit
counter at 3.579545 MHz Linux can use as a clocksource.

Offsets (from the PM1a event block, layout.ACPI_PM1_EVENT_PORT):
0-1 PM1_STS, 2-3 PM1_EN, 4-5 PM1_CNT, 8-11 PM_TMR, 12 the FADT's RESET_REG
(writing RESET_VALUE asks for a reboot: Linux's first choice of reboot method).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmpy.bus.device import InterruptLine
from kvmpy.errors import RestoreError

PM1_STATUS = 0
PM1_ENABLE = 2
PM1_CONTROL = 4
PM_TIMER = 8
RESET_REGISTER = 12
SIZE = 13
RESET_VALUE = 0x06

#: The SLP_TYP value the DSDT's \_S5 package names; writing it with SLP_EN powers off.
S5_SLP_TYP = 5
SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13

PM_TIMER_HZ = 3_579_545
TIMER_STATUS = 1 << 0  # TMR_STS: the timer's bit 23 flipped


@dataclass(frozen=True, slots=True)
class AcpiPmState:
    status: int
    enable: int
    control: int


class AcpiPm:
    """PM1a event/control and PM timer registers in one 12-port block."""

    def __init__(
        self,
        on_poweroff: Callable[[], None],
        on_reset: Callable[[], None],
        irq: InterruptLine,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self._irq_level = False
        self._irq = irq
        self._clock = clock
        self._start = clock()
        self._status = 0
        self._enable = 0
        self._control = SCI_EN  # no SMI handshake: ACPI mode from the start

    def _registers(self) -> bytes:
        ticks = int((self._clock() - self._start) * PM_TIMER_HZ) & 0xFFFFFF
        return (
            self._status.to_bytes(2, "little")
            + self._enable.to_bytes(2, "little")
            + self._control.to_bytes(2, "little")
            + b"\0\0"
            + ticks.to_bytes(4, "little")
            + b"\0"
        )

    def read(self, offset: int, data: memoryview) -> None:
        if not 0 <= offset < SIZE or offset + len(data) > SIZE:
            data[:] = b"\xff" * len(data)
            return
        data[:] = self._registers()[offset : offset + len(data)]

    def write(self, offset: int, data: bytes) -> None:
        for i, byte in enumerate(data):
            self._write_byte(offset + i, byte)
        if offset <= PM1_CONTROL + 1 < offset + len(data):  # the byte holding SLP_EN
            self._check_sleep()

    def _write_byte(self, offset: int, byte: int) -> None:
        if offset in (PM1_STATUS, PM1_STATUS + 1):
            shift = 8 * (offset - PM1_STATUS)
            self._status &= ~(byte << shift)  # write-one-to-clear
        elif offset in (PM1_ENABLE, PM1_ENABLE + 1):
            shift = 8 * (offset - PM1_ENABLE)
            self._enable = (self._enable & ~(0xFF << shift)) | (byte << shift)
        elif offset in (PM1_CONTROL, PM1_CONTROL + 1):
            shift = 8 * (offset - PM1_CONTROL)
            self._control = (self._control & ~(0xFF << shift)) | (byte << shift)
        elif offset == RESET_REGISTER and byte == RESET_VALUE:
            self._on_reset()
        level = bool(self._status & self._enable)
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

    def _check_sleep(self) -> None:
        if self._control & SLP_EN:
            self._control &= ~SLP_EN  # SLP_EN always reads as zero
            if (self._control & SLP_TYP_MASK) >> SLP_TYP_SHIFT == S5_SLP_TYP:
                self._on_poweroff()

    def save(self) -> AcpiPmState:
        return AcpiPmState(self._status, self._enable, self._control)

    def restore(self, state: AcpiPmState) -> None:
        if any(not 0 <= v <= 0xFFFF for v in (state.status, state.enable, state.control)):
            raise RestoreError("saved ACPI PM state has a register wider than 16 bits")
        self._status, self._enable = state.status, state.enable
        self._control = state.control & ~SLP_EN  # always reads 0: the sleep it asked for happened
        # The SCI's level lives on in KVM's restored irqchip: remember it, so that the guest
        # clearing its status lowers the line (a fresh device would think it already low).
        self._irq_level = bool(self._status & self._enable)


__all__ = ["S5_SLP_TYP", "AcpiPm", "AcpiPmState"]
