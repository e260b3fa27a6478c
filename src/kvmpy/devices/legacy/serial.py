"""A 16550A UART, the PC serial port Linux's 8250 driver knows best.

Register map (offsets from the base port, DLAB = LCR bit 7):

====  ==============  ==============
 off  read            write
====  ==============  ==============
  0   RBR / DLL       THR / DLL
  1   IER / DLM       IER / DLM
  2   IIR             FCR
  3   LCR             LCR
  4   MCR             MCR
  5   LSR             (ignored)
  6   MSR             (ignored)
  7   SCR             SCR
====  ==============  ==============

Transmission is instantaneous: a byte written to THR goes straight to the
output and THR is empty again, so LSR always shows THRE|TEMT and a THR-empty
interrupt follows every write when enabled. That costs one VM exit per byte,
which is exactly what makes this the "emulated" twin of virtio-console.

Threat model: the receive FIFO holds at most 64 bytes, as on the real chip;
input beyond that is refused (the host side keeps it) or, when the guest
does not read, dropped with LSR.OE set. No guest write can grow memory.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvmpy.bus.device import InterruptLine
from kvmpy.errors import RestoreError

FIFO_SIZE = 64

# Register offsets.
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# Bits.
IER_RDI = 0x01  # received data available
IER_THRI = 0x02  # transmitter holding register empty
IER_RLSI = 0x04  # receiver line status
IER_MSI = 0x08  # modem status
IER_MASK = 0x0F

IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0

FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04

LCR_DLAB = 0x80

MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F

LSR_DR = 0x01
LSR_OE = 0x02
LSR_THRE = 0x20
LSR_TEMT = 0x40

MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTA_MASK = 0x0F


@dataclass(frozen=True, slots=True)
class Uart16550State:
    """Everything a 16550A remembers, as plain data (for snapshots)."""

    ier: int
    fcr: int
    lcr: int
    mcr: int
    lsr_errors: int
    msr_deltas: int
    scr: int
    dll: int
    dlm: int
    thr_interrupt: bool
    rx_fifo: bytes


class Uart16550:
    """The UART's register model; the host side calls :meth:`enqueue_input`."""

    def __init__(self, irq: InterruptLine, output: Callable[[bytes], object]) -> None:
        self._irq = irq
        self._output = output
        self._lock = threading.Lock()
        self._rx: collections.deque[int] = collections.deque()
        self._irq_level = False
        self.overruns = 0
        self.bad_accesses = 0
        self._reset_registers()

    def _reset_registers(self) -> None:
        self._ier = 0
        self._fcr = 0
        self._lcr = 0x03  # 8N1
        self._mcr = MCR_OUT2
        self._lsr_errors = 0
        self._msr_deltas = 0
        self._scr = 0
        self._dll = 0x0C  # 9600 baud
        self._dlm = 0
        self._thr_interrupt = False
        self._rx.clear()

    # --- bus interface ---------------------------------------------------------------
    def read(self, offset: int, data: memoryview) -> None:
        if len(data) != 1:
            self.bad_accesses += 1
            data[:] = b"\xff" * len(data)
            return
        with self._lock:
            data[0] = self._read_register(offset)
            self._update_irq()

    def write(self, offset: int, data: bytes) -> None:
        if len(data) != 1:
            self.bad_accesses += 1
            return
        with self._lock:
            self._write_register(offset, data[0])
            self._update_irq()

    def _read_register(self, offset: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            return self._dll if dlab else self._receive_byte()
        if offset == IER_DLM:
            return self._dlm if dlab else self._ier
        if offset == IIR_FCR:
            return self._read_iir()
        if offset == LCR:
            return self._lcr
        if offset == MCR:
            return self._mcr
        if offset == LSR:
            value = self._line_status()
            self._lsr_errors = 0
            return value
        if offset == MSR:
            value = self._modem_status()
            self._msr_deltas = 0
            return value
        if offset == SCR:
            return self._scr
        self.bad_accesses += 1
        return 0xFF

    def _write_register(self, offset: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if offset == RBR_THR_DLL:
            if dlab:
                self._dll = value
            else:
                self._transmit(value)
        elif offset == IER_DLM:
            if dlab:
                self._dlm = value
            else:
                self._write_ier(value)
        elif offset == IIR_FCR:
            self._write_fcr(value)
        elif offset == LCR:
            self._lcr = value
        elif offset == MCR:
            self._write_mcr(value)
        elif offset == SCR:
            self._scr = value
        # LSR and MSR are read-only: writes are ignored, as on the chip.

    # --- registers --------------------------------------------------------------------
    def _write_ier(self, value: int) -> None:
        enabling_thri = value & IER_THRI and not self._ier & IER_THRI
        self._ier = value & IER_MASK
        if enabling_thri:
            # THR is always empty, so enabling its interrupt raises it at once.
            self._thr_interrupt = True

    def _write_fcr(self, value: int) -> None:
        if value & FCR_CLEAR_RCVR:
            self._rx.clear()
        self._fcr = value & 0xC9  # keep enable, DMA mode and trigger level bits

    def _write_mcr(self, value: int) -> None:
        old = self._mcr
        self._mcr = value & MCR_MASK
        changed = self._msr_from_mcr(old) ^ self._msr_from_mcr(self._mcr)
        if (old ^ self._mcr) & MCR_LOOP:
            changed = 0
        self._msr_deltas |= (changed >> 4) & MSR_DELTA_MASK

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            self._push_rx(value)
        else:
            self._output(bytes((value,)))
        self._thr_interrupt = True

    def _receive_byte(self) -> int:
        if not self._rx:
            return 0
        return self._rx.popleft()

    def _push_rx(self, value: int) -> bool:
        if len(self._rx) >= FIFO_SIZE:
            self._lsr_errors |= LSR_OE
            self.overruns += 1
            return False
        self._rx.append(value)
        return True

    def _line_status(self) -> int:
        value = LSR_THRE | LSR_TEMT | self._lsr_errors
        if self._rx:
            value |= LSR_DR
        return value

    @staticmethod
    def _msr_from_mcr(mcr: int) -> int:
        """Loopback wiring: RTS->CTS, DTR->DSR, OUT1->RI, OUT2->DCD."""
        value = 0
        if mcr & MCR_RTS:
            value |= MSR_CTS
        if mcr & MCR_DTR:
            value |= MSR_DSR
        if mcr & MCR_OUT1:
            value |= MSR_RI
        if mcr & MCR_OUT2:
            value |= MSR_DCD
        return value

    def _modem_status(self) -> int:
        if self._mcr & MCR_LOOP:
            lines = self._msr_from_mcr(self._mcr)
        else:
            lines = MSR_DCD | MSR_DSR | MSR_CTS  # a terminal is always attached
        return lines | self._msr_deltas

    def _pending_interrupt(self) -> int:
        """The highest-priority pending interrupt, as an IIR identification code."""
        if self._ier & IER_RLSI and self._lsr_errors:
            return IIR_RLSI
        if self._ier & IER_RDI and self._rx:
            return IIR_RDI
        if self._ier & IER_THRI and self._thr_interrupt:
            return IIR_THRI
        if self._ier & IER_MSI and self._msr_deltas:
            return IIR_MSI
        return IIR_NO_INT

    def _read_iir(self) -> int:
        pending = self._pending_interrupt()
        if pending == IIR_THRI:
            self._thr_interrupt = False  # reading IIR acknowledges THR empty
        fifo = IIR_FIFO_ENABLED if self._fcr & FCR_ENABLE_FIFO else 0
        return pending | fifo

    def _update_irq(self) -> None:
        level = (
            self._pending_interrupt() != IIR_NO_INT
            and bool(self._mcr & MCR_OUT2)
            and not self._mcr & MCR_LOOP
        )
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

    # --- host side ---------------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Offer host input to the receive FIFO; returns how many bytes fit."""
        with self._lock:
            room = FIFO_SIZE - len(self._rx)
            accepted = data[:room]
            self._rx.extend(accepted)
            self._update_irq()
            return len(accepted)

    # --- state -------------------------------------------------------------------------
    def save(self) -> Uart16550State:
        with self._lock:
            return Uart16550State(
                ier=self._ier,
                fcr=self._fcr,
                lcr=self._lcr,
                mcr=self._mcr,
                lsr_errors=self._lsr_errors,
                msr_deltas=self._msr_deltas,
                scr=self._scr,
                dll=self._dll,
                dlm=self._dlm,
                thr_interrupt=self._thr_interrupt,
                rx_fifo=bytes(self._rx),
            )

    def restore(self, state: Uart16550State) -> None:
        registers = (
            state.ier,
            state.fcr,
            state.lcr,
            state.mcr,
            state.lsr_errors,
            state.msr_deltas,
            state.scr,
            state.dll,
            state.dlm,
        )
        if any(not 0 <= value <= 0xFF for value in registers):
            raise RestoreError("saved UART state has a register value outside 0..255")
        if len(state.rx_fifo) > FIFO_SIZE:
            queued = len(state.rx_fifo)
            raise RestoreError(f"saved UART state has {queued} bytes queued, more than the FIFO holds")
        with self._lock:
            self._ier = state.ier & IER_MASK
            self._fcr = state.fcr
            self._lcr = state.lcr
            self._mcr = state.mcr & MCR_MASK
            self._lsr_errors = state.lsr_errors & LSR_OE
            self._msr_deltas = state.msr_deltas & MSR_DELTA_MASK
            self._scr = state.scr
            self._dll = state.dll
            self._dlm = state.dlm
            self._thr_interrupt = bool(state.thr_interrupt)
            self._rx = collections.deque(state.rx_fifo)
            self._update_irq()


__all__ = ["FIFO_SIZE", "Uart16550", "Uart16550State"]
