"""The i8042 keyboard controller with a PS/2 keyboard: Linux probes it, resets through it,
and the host sends it Ctrl-Alt-Del.

Linux's i8042 driver reads the status port, flushes the output buffer,
reads and writes the command byte and runs the controller self-test; its
reboot path pulses the CPU reset line with command 0xFE. A keyboard is
attached (see :mod:`ps2_keyboard`): bytes from it land in the output buffer
and raise IRQ 1 while the command byte enables the keyboard interrupt. No
mouse: the auxiliary port test reports "no device".

Port 0x61 (system control port B, offset 1 here) sits inside the range: it
reads the refresh-toggle bit 4 flipping on each read, which is what old
delay loops poll, and the PIT channel 2 gate bits the guest wrote.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvmpy.bus.device import InterruptLine
from kvmpy.devices.legacy.ps2_keyboard import Ps2Keyboard
from kvmpy.errors import RestoreError

DATA = 0  # port 0x60
PORT_B = 1  # port 0x61
COMMAND_STATUS = 4  # port 0x64

STATUS_OUTPUT_FULL = 0x01
STATUS_SYSTEM_FLAG = 0x04
STATUS_COMMAND = 0x08  # last write was to the command port

CMD_READ_COMMAND_BYTE = 0x20
CMD_WRITE_COMMAND_BYTE = 0x60
CMD_DISABLE_AUX = 0xA7
CMD_ENABLE_AUX = 0xA8
CMD_TEST_AUX = 0xA9
CMD_SELF_TEST = 0xAA
CMD_TEST_KBD = 0xAB
CMD_DISABLE_KBD = 0xAD
CMD_ENABLE_KBD = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_AUX = 0xD4
CMD_PULSE_RESET = 0xFE

SELF_TEST_OK = 0x55
PORT_TEST_OK = 0x00
PORT_TEST_NO_DEVICE = 0x01  # "clock line stuck low": nothing plugged in
#: Bytes waiting for the guest to read them; more are dropped (a real controller holds one).
OUTPUT_BUFFER_LIMIT = 16
COMMAND_BYTE_KBD_INTERRUPT = 0x01
COMMAND_BYTE_KBD_DISABLED = 0x10
COMMAND_BYTE_TRANSLATE = 0x40


@dataclass(frozen=True, slots=True)
class I8042State:
    command_byte: int
    output_port: int
    pending_command: int
    output: bytes
    port_b: int


class I8042:
    """The controller's registers; ``on_reset`` is called for a CPU reset request."""

    def __init__(self, on_reset: Callable[[], None], irq: InterruptLine | None = None) -> None:
        self._on_reset = on_reset
        self._irq = irq
        self._lock = threading.Lock()
        self.keyboard = Ps2Keyboard(self._from_keyboard)
        self._command_byte = 0x45  # translate, system flag, keyboard interrupt on
        self._output_port = 0x01  # A20 gate... bit 0 = not in reset
        self._pending_command = 0
        self._output: collections.deque[int] = collections.deque(maxlen=OUTPUT_BUFFER_LIMIT)
        self._port_b = 0
        self._last_was_command = False

    def read(self, offset: int, data: memoryview) -> None:
        with self._lock:
            self._read(offset, data)

    def _read(self, offset: int, data: memoryview) -> None:
        value = 0xFF
        if offset == DATA:
            value = self._output.popleft() if self._output else 0
            if self._output:
                self._interrupt()  # the next byte is ready
        elif offset == COMMAND_STATUS:
            value = self._status()
        elif offset == PORT_B:
            self._port_b ^= 0x10  # refresh toggle
            value = self._port_b
        data[:] = bytes([value]) * len(data)

    def write(self, offset: int, data: bytes) -> None:
        if not data:
            return
        with self._lock:
            self._write(offset, data[0])

    def _write(self, offset: int, value: int) -> None:
        if offset == DATA:
            self._last_was_command = False
            self._write_data(value)
        elif offset == COMMAND_STATUS:
            self._last_was_command = True
            self._command(value)
        elif offset == PORT_B:
            self._port_b = (self._port_b & 0x10) | (value & 0x0F)

    def _status(self) -> int:
        status = STATUS_SYSTEM_FLAG
        if self._output:
            status |= STATUS_OUTPUT_FULL
        if self._last_was_command:
            status |= STATUS_COMMAND
        return status

    def _command(self, command: int) -> None:
        if command == CMD_READ_COMMAND_BYTE:
            self._output.append(self._command_byte)
        elif command in (CMD_WRITE_COMMAND_BYTE, CMD_WRITE_OUTPUT_PORT, CMD_WRITE_AUX):
            self._pending_command = command
        elif command == CMD_SELF_TEST:
            self._output.append(SELF_TEST_OK)
        elif command == CMD_TEST_KBD:
            self._output.append(PORT_TEST_OK)
        elif command == CMD_TEST_AUX:
            self._output.append(PORT_TEST_NO_DEVICE)
        elif command == CMD_DISABLE_KBD:
            self._command_byte |= 0x10
        elif command == CMD_ENABLE_KBD:
            self._command_byte &= ~0x10
        elif command == CMD_DISABLE_AUX:
            self._command_byte |= 0x20
        elif command == CMD_ENABLE_AUX:
            self._command_byte &= ~0x20
        elif command == CMD_READ_OUTPUT_PORT:
            self._output.append(self._output_port)
        elif 0xF0 <= command <= 0xFF and not command & 0x01:  # CMD_PULSE_RESET and kin
            self._on_reset()  # pulse output-port bit 0 low: CPU reset

    def _write_data(self, value: int) -> None:
        command, self._pending_command = self._pending_command, 0
        if command == CMD_WRITE_COMMAND_BYTE:
            self._command_byte = value
        elif command == CMD_WRITE_OUTPUT_PORT:
            self._output_port = value
            if not value & 0x01:
                self._on_reset()
        elif command == CMD_WRITE_AUX:
            pass  # no mouse: nothing answers
        else:
            self._command_byte &= ~COMMAND_BYTE_KBD_DISABLED  # writing to the keyboard enables it
            self.keyboard.send(value)

    def _from_keyboard(self, data: bytes) -> None:
        """Bytes from the keyboard (lock held): into the output buffer, and IRQ 1 if enabled."""
        self._output.extend(data)
        self._interrupt()

    def _interrupt(self) -> None:
        if self._irq is not None and self._command_byte & COMMAND_BYTE_KBD_INTERRUPT:
            self._irq.pulse()

    def send_ctrl_alt_del(self) -> None:
        """The host presses Ctrl-Alt-Del on the keyboard (Firecracker's SendCtrlAltDel)."""
        with self._lock:
            translated = bool(self._command_byte & COMMAND_BYTE_TRANSLATE)
            self._from_keyboard(self.keyboard.press(("ctrl", "alt", "delete"), translated))

    def save(self) -> I8042State:
        return I8042State(
            self._command_byte, self._output_port, self._pending_command, bytes(self._output), self._port_b
        )

    def restore(self, state: I8042State) -> None:
        values = (state.command_byte, state.output_port, state.pending_command, state.port_b)
        if any(not 0 <= v <= 0xFF for v in values) or len(state.output) > OUTPUT_BUFFER_LIMIT:
            raise RestoreError("saved i8042 state has a register outside 0..255 or too much output")
        self._command_byte, self._output_port = state.command_byte, state.output_port
        self._pending_command, self._port_b = state.pending_command, state.port_b
        self._output = collections.deque(state.output, maxlen=OUTPUT_BUFFER_LIMIT)


__all__ = ["I8042", "I8042State"]
