"""The host side of the serial console: output sinks, the last lines, terminal input.

Output goes to stdout, a file or nowhere, and the last lines are kept so an
error report can show what the guest said before it died. Input comes from
the host terminal, switched to character-at-a-time mode without echo while
the VM runs (signals stay on, so Ctrl-C stops the VM) and restored after.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import termios
import threading
from collections.abc import Callable, Iterator
from typing import Protocol


class ConsoleSink(Protocol):
    """Where console bytes go: a binary file (stdout, a log) or a socket client."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> None: ...


class ConsoleOutput:
    """Where the guest's console bytes go, keeping the last lines for reports."""

    def __init__(self, sink: ConsoleSink | None, keep_lines: int = 20) -> None:
        self._sink = sink
        self._lines: collections.deque[bytes] = collections.deque(maxlen=keep_lines)
        self._partial = bytearray()
        self._lock = threading.Lock()
        self.bytes_written = 0

    def write(self, data: bytes) -> None:
        with self._lock:
            self.bytes_written += len(data)
            if self._sink is not None:
                self._sink.write(data)
                if b"\n" in data or len(data) > 1 or self._partial == b"":
                    self._sink.flush()
            self._remember(data)

    def _remember(self, data: bytes) -> None:
        self._partial += data
        if b"\n" not in data:  # the serial port's common case: one byte, mid-line
            if len(self._partial) > 8192:
                del self._partial[:-4096]
            return
        *complete, rest = self._partial.split(b"\n")
        self._lines.extend(bytes(line) for line in complete)
        self._partial = bytearray(rest[-4096:])

    def flush(self) -> None:
        with self._lock:
            if self._sink is not None:
                self._sink.flush()

    def last_lines(self) -> list[str]:
        with self._lock:
            lines = list(self._lines)
            if self._partial:
                lines.append(bytes(self._partial))
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines]


@contextlib.contextmanager
def terminal_input_mode(fd: int) -> Iterator[None]:
    """Character-at-a-time input without echo; restored on exit. No-op if not a tty."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    raw = termios.tcgetattr(fd)
    raw[0] &= ~(termios.ICRNL | termios.IXON)  # iflag: let the guest see CR, no flow control
    raw[3] &= ~(termios.ICANON | termios.ECHO | termios.IEXTEN)  # lflag; ISIG stays for Ctrl-C
    raw[6][termios.VMIN] = 1
    raw[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, raw)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


class InputPump(threading.Thread):
    """Reads host input and feeds it to the console device without losing bytes.

    ``deliver`` returns how many bytes the device accepted (its FIFO is
    bounded); the rest is kept and offered again shortly after.
    """

    def __init__(self, fd: int, deliver: Callable[[bytes], int]) -> None:
        super().__init__(name="console-input", daemon=True)
        self._fd = fd
        self._deliver = deliver
        self._stop_read, self._stop_write = os.pipe()
        self._pending = b""

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._stop_write, b"x")

    def run(self) -> None:
        try:
            self._pump()
        finally:
            os.close(self._stop_read)
            os.close(self._stop_write)

    def _pump(self) -> None:
        eof = False
        while True:
            watch = [self._stop_read] if eof or self._pending else [self._stop_read, self._fd]
            timeout = 0.01 if self._pending else None
            ready, _, _ = select.select(watch, [], [], timeout)
            if self._stop_read in ready:
                return
            if self._fd in ready:
                try:
                    chunk = os.read(self._fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    eof = True
                self._pending += chunk
            if self._pending:
                accepted = self._deliver(self._pending)
                self._pending = self._pending[accepted:]
            elif eof:
                return


__all__ = ["ConsoleOutput", "ConsoleSink", "InputPump", "terminal_input_mode"]
