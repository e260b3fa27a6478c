"""The legacy devices' registers: 16550A, i8042 with its PS/2 keyboard, CMOS RTC, ACPI PM,
pvpanic and debug-exit (with the POST code port), each in its own target."""

from __future__ import annotations

from collections.abc import Callable

from kvmpy.devices.legacy import acpi_pm, i8042, serial
from kvmpy.devices.legacy.acpi_pm import AcpiPm
from kvmpy.devices.legacy.debug_exit import DebugExit
from kvmpy.devices.legacy.i8042 import I8042
from kvmpy.devices.legacy.port_sinks import PostCode
from kvmpy.devices.legacy.pvpanic import PANICKED, SUPPORTED_EVENTS, PvPanic
from kvmpy.devices.legacy.rtc import CmosRtc
from kvmpy.devices.legacy.serial import Uart16550
from kvmpy.fuzz.harness import Reader, Target, check
from kvmpy.fuzz.targets.registers import EVENT, READ, ROUND_TRIP, WRITE, Operation, RegisterTarget, encode
from kvmpy.testing.fakes import RecordingInterruptLine


class UartTarget(RegisterTarget):
    name = "uart16550"
    span = 8
    invariants: tuple[str, ...] = (
        *RegisterTarget.invariants,
        "the receive FIFO never holds more than 64 bytes; host input is taken only as room allows",
        "every register in the saved state is a byte",
        "the IRQ line is high exactly when an enabled interrupt is pending with OUT2 set and "
        "loopback off (the 16550A's wiring, recomputed from the saved state)",
        "output bytes only come from THR writes",
    )

    def fresh(self) -> Uart16550:
        self.irq = RecordingInterruptLine()
        self.output = bytearray()
        self._thr_writes = 0
        return Uart16550(self.irq, self.output.extend)

    def wired(self) -> Uart16550:
        return Uart16550(self.irq, self.output.extend)

    def event(self, device: object, reader: Reader) -> None:
        assert isinstance(device, Uart16550)
        before = len(device.save().rx_fifo)
        data = reader.take(reader.u8())
        taken = device.enqueue_input(data)
        check(0 <= taken <= min(len(data), serial.FIFO_SIZE - before), f"enqueue_input took {taken}")
        check(len(device.save().rx_fifo) == before + taken, "enqueue_input lost or invented bytes")

    def after(self, device: object, operation: Operation) -> None:
        assert isinstance(device, Uart16550)
        if operation.kind == WRITE and operation.offset == serial.RBR_THR_DLL and operation.size == 1:
            self._thr_writes += 1
        state = device.save()
        check(len(state.rx_fifo) <= serial.FIFO_SIZE, f"receive FIFO holds {len(state.rx_fifo)} bytes")
        registers = (state.ier, state.fcr, state.lcr, state.mcr, state.lsr_errors, state.msr_deltas,
                     state.scr, state.dll, state.dlm)  # fmt: skip
        check(all(0 <= r <= 0xFF for r in registers), f"a UART register is not a byte: {state}")
        pending = (
            (state.ier & serial.IER_RLSI and state.lsr_errors)
            or (state.ier & serial.IER_RDI and state.rx_fifo)
            or (state.ier & serial.IER_THRI and state.thr_interrupt)
            or (state.ier & serial.IER_MSI and state.msr_deltas)
        )
        expected = bool(pending) and bool(state.mcr & serial.MCR_OUT2) and not state.mcr & serial.MCR_LOOP
        check(self.irq.level == expected, f"IRQ line is {self.irq.level}, the registers say {expected}")
        check(len(self.output) <= self._thr_writes, "output appeared without a THR write")

    def seeds(self) -> list[bytes]:
        # What Linux's 8250 driver does: probe the scratch register, set the divisor, enable
        # FIFOs and interrupts, loopback test, then print; and host input read back.
        probe = [(WRITE, 7, 1, 0xA5), (READ, 7, 1, 0), (WRITE, 3, 1, 0x80), (WRITE, 0, 1, 1),
                 (WRITE, 1, 1, 0), (WRITE, 3, 1, 0x03), (WRITE, 2, 1, 0xC7), (WRITE, 4, 1, 0x1B),
                 (WRITE, 0, 1, 0x41), (READ, 0, 1, 0), (READ, 6, 1, 0), (WRITE, 4, 1, 0x0B),
                 (WRITE, 1, 1, 0x0F), (READ, 2, 1, 0)]  # fmt: skip
        output = [(READ, 5, 1, 0), (WRITE, 0, 1, ord("x"))] * 4 + [(READ, 2, 1, 0), (ROUND_TRIP, 0, 1, 0)]
        receive = encode([(WRITE, 1, 1, 0x05), (EVENT, 0, 1, 0)]) + bytes([3]) + b"abc"
        receive += encode([(READ, 5, 1, 0), (READ, 0, 1, 0), (READ, 2, 1, 0), (ROUND_TRIP, 0, 1, 0)])
        return [encode(probe), encode(probe + output), receive]


class I8042Target(RegisterTarget):
    name = "i8042"
    span = 5
    invariants: tuple[str, ...] = (
        *RegisterTarget.invariants,
        "the output buffer never holds more than 16 bytes",
        "a CPU reset is requested only by a write (a reset command, or the output port with bit 0 clear)",
        "the keyboard's scancode set is 1, 2 or 3 and its LEDs three bits",
    )

    def fresh(self) -> I8042:
        self.resets = 0
        self.irq = RecordingInterruptLine()
        return I8042(self._reset, self.irq)

    def wired(self) -> I8042:
        return I8042(self._reset, self.irq)

    def _reset(self) -> None:
        self.resets += 1

    def run(self, data: bytes) -> None:
        self._resets_seen = 0
        super().run(data)

    def event(self, device: object, reader: Reader) -> None:
        assert isinstance(device, I8042)
        device.send_ctrl_alt_del()

    def after(self, device: object, operation: Operation) -> None:
        assert isinstance(device, I8042)
        state = device.save()
        check(len(state.output) <= i8042.OUTPUT_BUFFER_LIMIT, f"output buffer of {len(state.output)}")
        if self.resets != self._resets_seen:
            check(operation.kind == WRITE, f"a CPU reset came from a {operation}")
            self._resets_seen = self.resets
        keyboard = device.keyboard
        check(keyboard.scancode_set in (1, 2, 3) and 0 <= keyboard.leds <= 7, "keyboard state out of range")

    def seeds(self) -> list[bytes]:
        # Linux's i8042 probe, atkbd's keyboard set-up, Ctrl-Alt-Del, and the reboot pulse.
        probe = [(WRITE, 4, 1, 0x20), (READ, 4, 1, 0), (READ, 0, 1, 0), (WRITE, 4, 1, 0x60),
                 (WRITE, 0, 1, 0x65), (WRITE, 4, 1, 0xAA), (READ, 0, 1, 0), (WRITE, 4, 1, 0xA9),
                 (READ, 0, 1, 0), (WRITE, 4, 1, 0xAB), (READ, 0, 1, 0)]  # fmt: skip
        keyboard = [(WRITE, 0, 1, 0xFF), (READ, 0, 1, 0), (READ, 0, 1, 0), (WRITE, 0, 1, 0xF2),
                    (WRITE, 0, 1, 0xF0), (WRITE, 0, 1, 0x02), (WRITE, 0, 1, 0xED), (WRITE, 0, 1, 0x07),
                    (EVENT, 0, 1, 0), (READ, 0, 1, 0), (ROUND_TRIP, 0, 1, 0), (READ, 1, 1, 0),
                    (WRITE, 1, 1, 0x03)]  # fmt: skip
        reboot = [(WRITE, 4, 1, 0xD1), (WRITE, 0, 1, 0xFE), (WRITE, 4, 1, 0xFE)]
        return [encode(probe), encode(probe + keyboard), encode(keyboard + reboot)]


class RtcTarget(RegisterTarget):
    name = "rtc"
    span = 2
    invariants: tuple[str, ...] = (
        *RegisterTarget.invariants,
        "the selected index stays below 0x80 and CMOS holds 128 bytes",
        "the guest's clock offset stays a finite number of seconds",
    )

    def fresh(self) -> CmosRtc:
        self.now = 1_780_000_000.0  # a fixed host time, moved only by events
        return CmosRtc(clock=lambda: self.now)

    def wired(self) -> CmosRtc:
        return CmosRtc(clock=lambda: self.now)

    def event(self, device: object, reader: Reader) -> None:
        self.now += reader.u32()  # time passes (up to 136 years)

    def after(self, device: object, operation: Operation) -> None:
        assert isinstance(device, CmosRtc)
        state = device.save()
        check(0 <= state.index < 0x80 and len(state.cmos) == 128, "CMOS index or size out of range")
        check(abs(state.offset_seconds) < float("inf"), "the clock offset is not finite")

    def seeds(self) -> list[bytes]:
        # Linux's mc146818 driver: read the time (update-in-progress check first), set it.
        read_time = []
        for register in (0x0A, 0x00, 0x02, 0x04, 0x07, 0x08, 0x09, 0x32, 0x0B):
            read_time += [(WRITE, 0, 1, register), (READ, 1, 1, 0)]
        set_time = [(WRITE, 0, 1, 0x0B), (WRITE, 1, 1, 0x82)]
        for register, value in ((0x00, 0x30), (0x02, 0x15), (0x04, 0x11), (0x07, 0x01), (0x08, 0x12),
                                (0x09, 0x26), (0x32, 0x20)):  # fmt: skip
            set_time += [(WRITE, 0, 1, register), (WRITE, 1, 1, value)]
        set_time += [(WRITE, 0, 1, 0x0B), (WRITE, 1, 1, 0x02), (EVENT, 0, 1, 0), (ROUND_TRIP, 0, 1, 0)]
        return [encode(read_time), encode(set_time + read_time) + bytes(4)]


class AcpiPmTarget(RegisterTarget):
    name = "acpi-pm"
    span = acpi_pm.SIZE
    invariants: tuple[str, ...] = (
        *RegisterTarget.invariants,
        "poweroff only from a write of SLP_EN with SLP_TYP S5; reset only from RESET_VALUE written "
        "to the reset register",
        "SLP_EN always reads back as zero",
        "the SCI line is high exactly when PM1_STS & PM1_EN is not zero",
        "the PM timer reads 24 bits",
    )

    def fresh(self) -> AcpiPm:
        self.poweroffs = self.resets = 0
        self.now = 100.0
        self.irq = RecordingInterruptLine()
        return AcpiPm(self._poweroff, self._reset, self.irq, clock=lambda: self.now)

    def wired(self) -> AcpiPm:
        return AcpiPm(self._poweroff, self._reset, self.irq, clock=lambda: self.now)

    def _poweroff(self) -> None:
        self.poweroffs += 1

    def _reset(self) -> None:
        self.resets += 1

    def run(self, data: bytes) -> None:
        self._seen = (0, 0)
        super().run(data)

    def event(self, device: object, reader: Reader) -> None:
        self.now += reader.u32() / 1e6  # microseconds pass

    def after(self, device: object, operation: Operation) -> None:
        assert isinstance(device, AcpiPm)
        state = device.save()
        if self.poweroffs != self._seen[0]:
            first = operation.offset
            covers = operation.kind == WRITE and first <= acpi_pm.PM1_CONTROL + 1 < first + operation.size
            check(covers, f"poweroff from {operation}")
            check((state.control >> acpi_pm.SLP_TYP_SHIFT) & 7 == acpi_pm.S5_SLP_TYP, "poweroff, not S5")
        if self.resets != self._seen[1]:
            at = acpi_pm.RESET_REGISTER - operation.offset
            written = operation.value.to_bytes(operation.size, "little")
            check(operation.kind == WRITE and 0 <= at < operation.size and written[at] == acpi_pm.RESET_VALUE,
                  f"reset from {operation}")  # fmt: skip
        self._seen = (self.poweroffs, self.resets)
        check(not state.control & acpi_pm.SLP_EN, "SLP_EN reads back as one")
        check(
            self.irq.level == bool(state.status & state.enable), "SCI level disagrees with PM1_STS & PM1_EN"
        )
        timer = bytearray(4)
        device.read(acpi_pm.PM_TIMER, memoryview(timer))
        check(int.from_bytes(timer, "little") < 1 << 24, "the PM timer has more than 24 bits")

    def seeds(self) -> list[bytes]:
        # Linux: enable the fixed events, read the timer, then poweroff (S5) or reboot.
        boot = [(WRITE, 2, 2, 0x0121), (READ, 0, 2, 0), (WRITE, 0, 2, 0xFFFF), (READ, 8, 4, 0),
                (EVENT, 0, 1, 0), (READ, 8, 4, 0), (ROUND_TRIP, 0, 1, 0)]  # fmt: skip
        poweroff = [(WRITE, 4, 2, 5 << 10 | 1), (WRITE, 4, 2, 5 << 10 | 1 << 13 | 1)]
        reboot = [(WRITE, 12, 1, acpi_pm.RESET_VALUE)]
        return [encode(boot) + bytes(4), encode(boot + poweroff) + bytes(4), encode(boot + reboot) + bytes(4)]


class PanicExitTarget(RegisterTarget):
    """pvpanic at offset 0, debug-exit at 1 and the POST code port at 2 of one three-port range."""

    name = "pvpanic-debug-exit"
    span = 3
    invariants: tuple[str, ...] = (
        "no read or write raises, whatever the offset and size",
        "pvpanic reads its supported events and reports a panic only for a write with PANICKED",
        "debug-exit reports exactly the byte written, and only for writes",
        "the POST code port reads back the last byte written",
    )

    def fresh(self) -> object:
        self.panics, self.exits = 0, list[int]()
        self.ports = (PvPanic(self._panic), DebugExit(self.exits.append), PostCode())
        return self

    def _panic(self) -> None:
        self.panics += 1

    # The three ports, each at its own offset: the bus sends each a one-port range.
    def read(self, offset: int, data: memoryview) -> None:
        self.ports[offset].read(0, data)  # type: ignore[attr-defined]
        if offset == 0:
            check(bytes(data) == bytes([SUPPORTED_EVENTS]) * len(data), "pvpanic read the wrong events")
        if offset == 2:
            check(bytes(data) == bytes([self.ports[2].last_code]) * len(data), "POST code read back wrong")

    def write(self, offset: int, data: bytes) -> None:
        panics, exits = self.panics, len(self.exits)
        self.ports[offset].write(0, data)  # type: ignore[attr-defined]
        expect_panic = offset == 0 and bool(data) and bool(data[0] & PANICKED)
        check(self.panics - panics == int(expect_panic), "pvpanic panicked without PANICKED")
        check(self.exits[exits:] == ([data[0]] if offset == 1 and data else []), "debug-exit code wrong")

    def save(self) -> tuple[int, int]:
        return self.panics, len(self.exits)

    def restore(self, state: object) -> None:
        pass

    def round_trip(self, device: object) -> object:
        return device  # these ports keep no state worth a snapshot

    def seeds(self) -> list[bytes]:
        return [encode([(READ, 0, 1, 0), (WRITE, 2, 1, 0x42), (READ, 2, 1, 0), (WRITE, 0, 1, 1),
                        (WRITE, 1, 1, 3)])]  # fmt: skip


FACTORIES: dict[str, Callable[[], Target]] = {
    "uart16550": UartTarget,
    "i8042": I8042Target,
    "rtc": RtcTarget,
    "acpi-pm": AcpiPmTarget,
    "pvpanic-debug-exit": PanicExitTarget,
}

__all__ = ["FACTORIES"]
