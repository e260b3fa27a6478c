"""A PS/2 (AT) keyboard behind the i8042: enough for Linux's atkbd to bind, and keys from the host.

Linux's atkbd resets the keyboard, reads its ID, selects scancode set 2 and
sets the LEDs; each command byte gets an ACK (0xFA) and its answer. The
host presses keys with ``press()``: Ctrl-Alt-Del is Firecracker's
SendCtrlAltDel, which Linux turns into a SIGINT to init (a reboot or a
poweroff, as the guest's init is configured).

Scancodes are produced in set 2, or in set 1 when the controller translates
(command byte bit 6, Linux's default), as a real controller would deliver them.
"""

from __future__ import annotations

from collections.abc import Callable

ACK = 0xFA
RESEND = 0xFE
SELF_TEST_PASSED = 0xAA
ECHO = 0xEE
KEYBOARD_ID = (0xAB, 0x83)  # MF2 keyboard

# Keyboard commands (the ones that take an argument byte are listed in _WITH_ARGUMENT).
CMD_SET_LEDS = 0xED
CMD_ECHO = 0xEE
CMD_SCANCODE_SET = 0xF0
CMD_IDENTIFY = 0xF2
CMD_TYPEMATIC = 0xF3
CMD_ENABLE = 0xF4
CMD_DISABLE = 0xF5
CMD_DEFAULTS = 0xF6
CMD_RESEND = 0xFE
CMD_RESET = 0xFF
_WITH_ARGUMENT = frozenset({CMD_SET_LEDS, CMD_SCANCODE_SET, CMD_TYPEMATIC})

#: Make codes of the keys the host can press: name -> (set 1, set 2). A leading 0xE0 is
#: an extended key; a set-1 break code sets bit 7, a set-2 break code is preceded by 0xF0.
KEYS: dict[str, tuple[bytes, bytes]] = {
    "ctrl": (b"\x1d", b"\x14"),
    "alt": (b"\x38", b"\x11"),
    "delete": (b"\xe0\x53", b"\xe0\x71"),
}


def make_code(key: str, translated: bool) -> bytes:
    set1, set2 = KEYS[key]
    return set1 if translated else set2


def break_code(key: str, translated: bool) -> bytes:
    set1, set2 = KEYS[key]
    if translated:
        return set1[:-1] + bytes([set1[-1] | 0x80])
    return set2[:-1] + b"\xf0" + set2[-1:]


class Ps2Keyboard:
    """The keyboard's side of the wire: ``send(byte)`` from the controller, answers to ``deliver``."""

    def __init__(self, deliver: Callable[[bytes], None]) -> None:
        self._deliver = deliver
        self._pending_command = 0
        self.scancode_set = 2
        self.leds = 0
        self.enabled = True

    def send(self, value: int) -> None:
        """A byte the guest wrote to the keyboard through the controller's data port."""
        command, self._pending_command = self._pending_command, 0
        if command:
            self._argument(command, value)
        elif value in _WITH_ARGUMENT:
            self._pending_command = value
            self._deliver(bytes([ACK]))
        else:
            self._deliver(self._answer(value))

    def _answer(self, command: int) -> bytes:
        if command == CMD_RESET:
            self._defaults()
            return bytes([ACK, SELF_TEST_PASSED])
        if command == CMD_IDENTIFY:
            return bytes([ACK, *KEYBOARD_ID])
        if command == CMD_ECHO:
            return bytes([ECHO])
        if command == CMD_ENABLE:
            self.enabled = True
        elif command == CMD_DISABLE:
            self._defaults()
            self.enabled = False
        elif command == CMD_DEFAULTS:
            self._defaults()
        elif command == CMD_RESEND or command < 0xED:
            return bytes([RESEND])  # not a command: a real keyboard asks for it again
        return bytes([ACK])

    def _argument(self, command: int, value: int) -> None:
        if command == CMD_SCANCODE_SET and value == 0:
            self._deliver(bytes([ACK, self.scancode_set]))
            return
        if command == CMD_SCANCODE_SET and value in (1, 2, 3):
            self.scancode_set = value
        elif command == CMD_SET_LEDS:
            self.leds = value & 0x07
        self._deliver(bytes([ACK]))

    def _defaults(self) -> None:
        self.scancode_set, self.leds, self.enabled = 2, 0, True

    def press(self, keys: tuple[str, ...], translated: bool) -> bytes:
        """Press ``keys`` together and release them in reverse order; returns the scancodes."""
        codes = b"".join(make_code(k, translated) for k in keys)
        codes += b"".join(break_code(k, translated) for k in reversed(keys))
        return codes


__all__ = ["KEYS", "Ps2Keyboard", "break_code", "make_code"]
