"""The 16550A model against what Linux's 8250 driver does with it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvmpy.devices.legacy import serial as uart
from kvmpy.devices.legacy.serial import FIFO_SIZE, Uart16550
from kvmpy.testing.fakes import PortAccessor, RecordingInterruptLine


def make() -> tuple[Uart16550, PortAccessor, RecordingInterruptLine, list[bytes]]:
    out: list[bytes] = []
    irq = RecordingInterruptLine()
    device = Uart16550(irq=irq, output=out.append)
    return device, PortAccessor(device), irq, out


def test_linux_autoconfig_finds_a_16550a() -> None:
    _, port, _, _ = make()
    # Scratch register and IER tests (8250_port.c autoconfig).
    port.outb(uart.SCR, 0xA5)
    assert port.inb(uart.SCR) == 0xA5
    port.outb(uart.IER_DLM, 0)
    assert port.inb(uart.IER_DLM) & 0x0F == 0
    port.outb(uart.IER_DLM, 0x0F)
    assert port.inb(uart.IER_DLM) & 0x0F == 0x0F
    port.outb(uart.IER_DLM, 0)
    # Loopback test of the modem status lines.
    port.outb(uart.MCR, uart.MCR_LOOP | 0x0A)
    assert port.inb(uart.MSR) & 0xF0 == 0x90
    port.outb(uart.MCR, 0)
    # FIFO detection: IIR bits 7:6 = 11 means a 16550A, bit 5 clear (not a 16750).
    port.outb(uart.IIR_FCR, uart.FCR_ENABLE_FIFO)
    assert port.inb(uart.IIR_FCR) >> 6 == 3
    port.outb(uart.IIR_FCR, uart.FCR_ENABLE_FIFO | 0x20)
    assert not port.inb(uart.IIR_FCR) & 0x20
    # XScale UUE bit does not stick.
    port.outb(uart.IER_DLM, 0x40)
    assert not port.inb(uart.IER_DLM) & 0x40


def test_transmit_reaches_output_and_raises_thre() -> None:
    _, port, irq, out = make()
    port.outb(uart.MCR, uart.MCR_OUT2)
    for byte in b"hi\n":
        port.outb(uart.RBR_THR_DLL, byte)
    assert b"".join(out) == b"hi\n"
    assert port.inb(uart.LSR) & (uart.LSR_THRE | uart.LSR_TEMT) == uart.LSR_THRE | uart.LSR_TEMT
    port.outb(uart.IER_DLM, uart.IER_THRI)
    assert irq.level
    assert port.inb(uart.IIR_FCR) & 0x0F == uart.IIR_THRI
    assert port.inb(uart.IIR_FCR) & 0x0F == uart.IIR_NO_INT  # reading IIR acknowledged it
    assert not irq.level


def test_thre_retriggers_when_ier_toggles() -> None:
    """The driver's UART_BUG_THRE probe expects an interrupt after each IER enable."""
    _, port, _, _ = make()
    port.outb(uart.IER_DLM, uart.IER_THRI)
    first = port.inb(uart.IIR_FCR)
    port.outb(uart.IER_DLM, 0)
    port.outb(uart.IER_DLM, uart.IER_THRI)
    second = port.inb(uart.IIR_FCR)
    assert not first & uart.IIR_NO_INT and not second & uart.IIR_NO_INT


def test_receive_fifo_order_cap_and_interrupt() -> None:
    device, port, irq, _ = make()
    port.outb(uart.MCR, uart.MCR_OUT2)
    port.outb(uart.IER_DLM, uart.IER_RDI)
    assert device.enqueue_input(bytes(range(100))) == FIFO_SIZE
    assert irq.level
    assert port.inb(uart.IIR_FCR) & 0x0F == uart.IIR_RDI
    received = []
    while port.inb(uart.LSR) & uart.LSR_DR:
        received.append(port.inb(uart.RBR_THR_DLL))
    assert received == list(range(FIFO_SIZE))
    assert not irq.level


def test_out2_gates_the_interrupt_line() -> None:
    device, port, irq, _ = make()
    port.outb(uart.MCR, 0)
    port.outb(uart.IER_DLM, uart.IER_RDI)
    device.enqueue_input(b"x")
    assert not irq.level
    port.outb(uart.MCR, uart.MCR_OUT2)
    assert irq.level


def test_loopback_sends_to_receiver_not_output() -> None:
    _, port, _, out = make()
    port.outb(uart.MCR, uart.MCR_LOOP)
    port.outb(uart.RBR_THR_DLL, 0x41)
    assert out == []
    assert port.inb(uart.RBR_THR_DLL) == 0x41


def test_overrun_sets_oe_and_line_status_interrupt() -> None:
    _, port, irq, _ = make()
    port.outb(uart.MCR, uart.MCR_LOOP)
    for _ in range(FIFO_SIZE + 1):
        port.outb(uart.RBR_THR_DLL, 0x55)
    assert port.inb(uart.LSR) & uart.LSR_OE
    assert not port.inb(uart.LSR) & uart.LSR_OE  # reading LSR clears errors


def test_divisor_latch() -> None:
    _, port, _, out = make()
    port.outb(uart.LCR, uart.LCR_DLAB | 0x03)
    port.outb(uart.RBR_THR_DLL, 0x01)
    port.outb(uart.IER_DLM, 0x00)
    assert port.inb(uart.RBR_THR_DLL) == 0x01
    port.outb(uart.LCR, 0x03)
    assert out == []  # the DLL write was not a transmitted byte


def test_save_restore_roundtrip() -> None:
    device, port, _, _ = make()
    port.outb(uart.SCR, 0x12)
    port.outb(uart.IER_DLM, uart.IER_RDI)
    device.enqueue_input(b"abc")
    state = device.save()
    other, other_port, other_irq, _ = make()
    other.restore(state)
    assert other.save() == state
    assert other_port.inb(uart.RBR_THR_DLL) == ord("a")
    assert other_irq.level


@given(
    st.lists(
        st.tuples(st.integers(0, 7), st.integers(1, 8), st.integers(0, 255), st.booleans()), max_size=200
    )
)
def test_hostile_register_traffic_never_raises(accesses: list[tuple[int, int, int, bool]]) -> None:
    device, _, _, out = make()
    for offset, size, value, is_write in accesses:
        if is_write:
            device.write(offset, bytes([value]) * size)
        else:
            buffer = bytearray(size)
            device.read(offset, memoryview(buffer))
    assert len(device.save().rx_fifo) <= FIFO_SIZE
    assert sum(len(chunk) for chunk in out) <= len(accesses)
