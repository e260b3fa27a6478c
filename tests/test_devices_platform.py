"""debug-exit, i8042, CMOS RTC, ACPI PM and the port sinks, register by register."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmpy.devices.legacy import acpi_pm, i8042, rtc
from kvmpy.devices.legacy.acpi_pm import AcpiPm
from kvmpy.devices.legacy.debug_exit import DebugExit
from kvmpy.devices.legacy.i8042 import I8042
from kvmpy.devices.legacy.port_sinks import PostCode, QuietPorts
from kvmpy.devices.legacy.rtc import CmosRtc
from kvmpy.testing.fakes import PortAccessor, RecordingInterruptLine


def test_debug_exit_reports_the_code() -> None:
    codes: list[int] = []
    PortAccessor(DebugExit(codes.append)).outb(0, 42)
    assert codes == [42]


def test_i8042_self_test_command_byte_and_reset() -> None:
    resets: list[bool] = []
    port = PortAccessor(I8042(lambda: resets.append(True)))
    port.outb(i8042.COMMAND_STATUS, i8042.CMD_SELF_TEST)
    assert port.inb(i8042.COMMAND_STATUS) & i8042.STATUS_OUTPUT_FULL
    assert port.inb(i8042.DATA) == i8042.SELF_TEST_OK
    port.outb(i8042.COMMAND_STATUS, i8042.CMD_WRITE_COMMAND_BYTE)
    port.outb(i8042.DATA, 0x47)
    port.outb(i8042.COMMAND_STATUS, i8042.CMD_READ_COMMAND_BYTE)
    assert port.inb(i8042.DATA) == 0x47
    port.outb(i8042.COMMAND_STATUS, i8042.CMD_TEST_KBD)
    assert port.inb(i8042.DATA) == i8042.PORT_TEST_OK
    port.outb(i8042.COMMAND_STATUS, i8042.CMD_TEST_AUX)
    assert port.inb(i8042.DATA) == i8042.PORT_TEST_NO_DEVICE
    assert not resets
    port.outb(i8042.COMMAND_STATUS, 0xFE)
    assert resets == [True]


def _drain(port: PortAccessor) -> list[int]:
    out = []
    while port.inb(i8042.COMMAND_STATUS) & i8042.STATUS_OUTPUT_FULL:
        out.append(port.inb(i8042.DATA))
    return out


def test_keyboard_answers_linux_atkbd_probe() -> None:
    """The sequence atkbd sends: reset, identify, select set 2, read it back, LEDs, enable."""
    irq = RecordingInterruptLine()
    port = PortAccessor(I8042(lambda: None, irq=irq))
    port.outb(i8042.DATA, 0xFF)
    assert _drain(port) == [0xFA, 0xAA]
    assert irq.levels.count(True) >= 1
    port.outb(i8042.DATA, 0xF2)
    assert _drain(port) == [0xFA, 0xAB, 0x83]
    port.outb(i8042.DATA, 0xF0)
    port.outb(i8042.DATA, 0x02)
    port.outb(i8042.DATA, 0xF0)
    port.outb(i8042.DATA, 0x00)
    assert _drain(port) == [0xFA, 0xFA, 0xFA, 0xFA, 0x02]
    port.outb(i8042.DATA, 0xED)
    port.outb(i8042.DATA, 0x07)
    port.outb(i8042.DATA, 0xF4)
    assert _drain(port) == [0xFA, 0xFA, 0xFA]
    port.outb(i8042.DATA, 0x12)  # not a command
    assert _drain(port) == [0xFE]


def test_ctrl_alt_del_in_translated_and_raw_scancodes() -> None:
    irq = RecordingInterruptLine()
    controller = I8042(lambda: None, irq=irq)
    port = PortAccessor(controller)
    controller.send_ctrl_alt_del()  # the default command byte translates to set 1
    assert _drain(port) == [0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D]
    port.outb(i8042.COMMAND_STATUS, i8042.CMD_WRITE_COMMAND_BYTE)
    port.outb(i8042.DATA, 0x01)  # interrupts on, no translation: set 2
    before = irq.levels.count(True)
    controller.send_ctrl_alt_del()
    assert _drain(port) == [0x14, 0x11, 0xE0, 0x71, 0xE0, 0xF0, 0x71, 0xF0, 0x11, 0xF0, 0x14]
    assert irq.levels.count(True) > before
    port.outb(i8042.COMMAND_STATUS, i8042.CMD_WRITE_COMMAND_BYTE)
    port.outb(i8042.DATA, 0x00)  # keyboard interrupt off: bytes arrive, no IRQ
    before = irq.levels.count(True)
    controller.send_ctrl_alt_del()
    assert irq.levels.count(True) == before
    assert len(_drain(port)) == 11


def test_rtc_reads_the_clock_in_bcd_and_binary() -> None:
    moment = datetime.datetime(2026, 11, 24, 13, 45, 59, tzinfo=datetime.UTC).timestamp()
    port = PortAccessor(CmosRtc(clock=lambda: moment))

    def register(index: int) -> int:
        port.outb(rtc.INDEX, index | 0x80)  # NMI-disable bit must not change the index
        return port.inb(rtc.DATA)

    assert [register(i) for i in (rtc.REG_HOURS, rtc.REG_MINUTES, rtc.REG_SECONDS)] == [0x13, 0x45, 0x59]
    assert (register(rtc.REG_DAY), register(rtc.REG_MONTH), register(rtc.REG_YEAR)) == (0x24, 0x11, 0x26)
    assert register(rtc.REG_CENTURY) == 0x20
    assert not register(rtc.REG_A) & 0x80  # UIP never set
    assert register(rtc.REG_D) & rtc.D_VALID_RAM_TIME
    port.outb(rtc.INDEX, rtc.REG_B)
    port.outb(rtc.DATA, rtc.B_24_HOUR | rtc.B_BINARY)
    assert register(rtc.REG_HOURS) == 13


def test_rtc_setting_the_time_moves_an_offset_only() -> None:
    device = CmosRtc(clock=lambda: 0.0)
    port = PortAccessor(device)
    port.outb(rtc.INDEX, rtc.REG_YEAR)
    port.outb(rtc.DATA, 0x99)
    port.outb(rtc.INDEX, rtc.REG_YEAR)
    assert port.inb(rtc.DATA) == 0x99
    assert device.save().offset_seconds != 0


def test_acpi_pm_poweroff_and_reset() -> None:
    events: list[str] = []
    device = AcpiPm(lambda: events.append("off"), lambda: events.append("reset"), RecordingInterruptLine())
    value = (acpi_pm.S5_SLP_TYP << acpi_pm.SLP_TYP_SHIFT) | acpi_pm.SLP_EN
    device.write(acpi_pm.PM1_CONTROL, (value & 0xFFFF).to_bytes(2, "little"))
    assert events == ["off"]
    device.write(acpi_pm.PM1_CONTROL, ((1 << acpi_pm.SLP_TYP_SHIFT) | acpi_pm.SLP_EN).to_bytes(2, "little"))
    assert events == ["off"]  # S1 is not poweroff
    device.write(acpi_pm.RESET_REGISTER, bytes([acpi_pm.RESET_VALUE]))
    assert events == ["off", "reset"]


def test_acpi_pm_timer_counts_at_3_58_mhz() -> None:
    now = [100.0]
    device = AcpiPm(lambda: None, lambda: None, RecordingInterruptLine(), clock=lambda: now[0])
    data = bytearray(4)
    now[0] += 1.0
    device.read(acpi_pm.PM_TIMER, memoryview(data))
    assert int.from_bytes(data, "little") == acpi_pm.PM_TIMER_HZ & 0xFFFFFF


def test_post_code_and_quiet_ports() -> None:
    post = PortAccessor(PostCode())
    post.outb(0, 0x3C)
    assert post.inb(0) == 0x3C
    assert PortAccessor(QuietPorts()).inb(0) == 0xFF


@pytest.mark.parametrize(
    "factory",
    [
        lambda: I8042(lambda: None),
        lambda: CmosRtc(),
        lambda: AcpiPm(lambda: None, lambda: None, RecordingInterruptLine()),
        lambda: DebugExit(lambda code: None),
    ],
)
@given(accesses=st.lists(st.tuples(st.integers(0, 15), st.integers(1, 8), st.integers(0, 255)), max_size=100))
def test_hostile_traffic_never_raises(factory, accesses) -> None:  # type: ignore[no-untyped-def]
    device = factory()
    for offset, size, value in accesses:
        device.write(offset, bytes([value]) * size)
        device.read(offset, memoryview(bytearray(size)))


def test_rtc_survives_the_end_of_year_9999_and_can_be_set_back() -> None:
    """Set to 9999-12-31 23:59:59, one second later every time register read raised ValueError
    (datetime ends at year 9999) and the guest could not set the clock back."""
    now = [datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC).timestamp()]
    port = PortAccessor(CmosRtc(clock=lambda: now[0]))

    def write(index: int, value: int) -> None:
        port.outb(rtc.INDEX, index)
        port.outb(rtc.DATA, value)

    def read(index: int) -> int:
        port.outb(rtc.INDEX, index)
        return port.inb(rtc.DATA)

    for index, value in (
        (rtc.REG_CENTURY, 0x99), (rtc.REG_YEAR, 0x99), (rtc.REG_MONTH, 0x12), (rtc.REG_DAY, 0x31),
        (rtc.REG_HOURS, 0x23), (rtc.REG_MINUTES, 0x59), (rtc.REG_SECONDS, 0x59),
    ):  # fmt: skip
        write(index, value)
    assert (read(rtc.REG_CENTURY), read(rtc.REG_YEAR), read(rtc.REG_SECONDS)) == (0x99, 0x99, 0x59)
    now[0] += 2
    registers = [read(index) for index in (rtc.REG_SECONDS, rtc.REG_MINUTES, rtc.REG_HOURS, rtc.REG_DAY)]
    assert registers == [0x01, 0x00, 0x00, 0x01]  # midnight, a new day: no exception
    assert read(rtc.REG_MONTH) == 0x01 and read(rtc.REG_YEAR) == 0x00
    write(rtc.REG_SECONDS, 0x30)  # writes work past the end too
    write(rtc.REG_CENTURY, 0x20)
    write(rtc.REG_YEAR, 0x26)
    assert (read(rtc.REG_CENTURY), read(rtc.REG_YEAR), read(rtc.REG_SECONDS)) == (0x20, 0x26, 0x30)


def test_rtc_far_offsets_never_raise() -> None:
    device = CmosRtc(clock=lambda: 0.0)
    for offset in (1e18, -1e18, 253402300800.0, -62135596801.0):
        device.restore(rtc.CmosRtcState(0, bytes(device.save().cmos), offset))
        port = PortAccessor(device)
        for index in (rtc.REG_SECONDS, rtc.REG_DAY, rtc.REG_YEAR, rtc.REG_CENTURY):
            port.outb(rtc.INDEX, index)
            port.inb(rtc.DATA)
            port.outb(rtc.DATA, 0x01)


def test_restore_refuses_bad_state_with_a_kvmpy_error() -> None:
    """Saved state is untrusted input: a bad one is a RestoreError with one line, never ValueError."""
    from kvmpy.devices.legacy.serial import Uart16550
    from kvmpy.errors import HostError, RestoreError
    from kvmpy.virtio.queue import QueueState, SplitQueue

    uart = Uart16550(RecordingInterruptLine(), output=lambda data: None)
    rtc_device = CmosRtc()
    bad = [
        (lambda: rtc_device.restore(rtc.CmosRtcState(0, b"", 0.0)), "CMOS"),
        (lambda: rtc_device.restore(rtc.CmosRtcState(0, bytes(128), float("nan"))), "CMOS"),
        (lambda: AcpiPm(lambda: None, lambda: None, RecordingInterruptLine()).restore(
            acpi_pm.AcpiPmState(0x1_0000, 0, 0)), "ACPI"),
        (lambda: I8042(lambda: None).restore(i8042.I8042State(256, 0, 0, b"", 0)), "i8042"),
        (lambda: uart.restore(dataclass_replace(uart.save(), ier=300)), "UART"),
        (lambda: SplitQueue(16).restore(QueueState(3, True, 0, 0, 0, 0, 0, False)), "queue"),
        (lambda: SplitQueue(16).restore(QueueState(16, True, 0, 0, 0, 1 << 16, 0, False)), "queue"),
    ]  # fmt: skip
    for restore, name in bad:
        with pytest.raises(RestoreError, match=name) as raised:
            restore()
        assert isinstance(raised.value, HostError) and "\n" not in str(raised.value)


def dataclass_replace(state, **changes):  # type: ignore[no-untyped-def]
    import dataclasses

    return dataclasses.replace(state, **changes)
