"""The host side of the serial console: output sinks, the last lines, terminal input.

Output goes to stdout, a file or nowhere, and the last lines are kept so an
error report can show what the guest said before it died. Input comes from
the host terminal, switched to character-at-a-time mode without echo while
the VM runs (signals stay on, so Ctrl-C stops the VM) and restored after.

The guest is hostile here too, and its output arrives on a vCPU thread (the
16550A) or the event loop (virtio-console, whole buffers of up to 4 GiB):
writing costs bounded work and memory whatever the guest sends. The bytes
go into a bounded buffer that a writer thread hands to the sink, so a sink
that blocks (a socket client that stopped reading, a slow disk) costs
dropped bytes, counted, and never a stalled guest; a log file stops at a
size limit with a note saying so.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import termios
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

from kvmpy.jail.seccomp import Role, enter_role
from kvmpy.virtio.token_bucket import TokenBucket

log = logging.getLogger("kvmpy.console")

#: Bytes waiting for the writer thread at most: beyond it, output is dropped (and counted).
BUFFER_LIMIT = 1 << 20
#: The tail kept for error reports: enough for 20 lines of a chatty console, whatever the burst.
TAIL_BYTES = 8192
#: A log file's size limit for one run (1 GiB): a guest that prints forever does not fill the disk.
FILE_LIMIT = 1 << 30
#: How long the writer thread lingers without output before it ends (a new one starts on demand).
WRITER_IDLE_SECONDS = 1.0
#: How long the writer lets output gather before writing it: the 16550A hands over a byte per
#: exit, and one write (and one wake-up of this thread) per byte would cost the vCPU's GIL time.
GATHER_SECONDS = 0.002
#: How long ``flush`` waits for a sink that does not take its bytes.
FLUSH_TIMEOUT_SECONDS = 2.0


class ConsoleSink(Protocol):
    """Where console bytes go: a binary file (stdout, a log) or a socket client."""

    def write(self, data: bytes, /) -> object: ...

    def flush(self) -> None: ...


class FileSink:
    """A log file that takes at most ``limit`` bytes from this run, then a note and no more."""

    def __init__(self, file: BinaryIO, limit: int = FILE_LIMIT) -> None:
        self._file = file
        self.limit = limit
        self.written = 0
        self.dropped = 0

    def write(self, data: bytes, /) -> int:
        room = self.limit - self.written
        if room <= 0:
            self.dropped += len(data)
            return len(data)
        kept = data[:room]
        self._file.write(kept)
        self.written += len(kept)
        if len(kept) < len(data):
            self.dropped += len(data) - len(kept)
            self._file.write(
                f"\n[kvmpy: console output limit of {self.limit} bytes reached;"
                " further output is dropped]\n".encode()
            )
        return len(data)

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleOutput:
    """Where the guest's console bytes go, keeping the last lines for reports.

    ``write`` only copies what the buffer has room for and the tail it keeps (at most
    BUFFER_LIMIT + TAIL_BYTES bytes, whatever it is given) and returns: a writer thread
    does the sink's I/O.
    """

    def __init__(
        self,
        sink: ConsoleSink | None,
        keep_lines: int = 20,
        rate: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``rate``: at most that many bytes per second reach the sink (a second's worth at once);
        the rest is dropped and counted in ``rate_limited``, as a full buffer's bytes are."""
        self._sink = sink
        self._limit = TokenBucket(rate, 1000) if rate is not None else None
        self._clock = clock
        #: Bytes the rate limit kept from the sink.
        self.rate_limited = 0
        self._keep_lines = keep_lines
        self._tail = bytearray()
        self._pending = bytearray()
        self._lock = threading.Lock()
        self._data = threading.Condition(self._lock)  # the writer waits for output
        self._drained = threading.Condition(self._lock)  # flush waits for the writer
        self._writer: threading.Thread | None = None
        self._idle = False  # the writer waits on _data
        self._writing = False
        self.bytes_written = 0
        #: Bytes the sink never got because the buffer was full (a slow or stalled consumer).
        self.dropped = 0
        self.sink_errors = 0

    def write(self, data: bytes | memoryview) -> None:
        size = len(data)
        with self._lock:
            self.bytes_written += size
            self._remember(data)
            if self._sink is None:
                return
            if self._limit is not None:
                data = self._within_rate(data)
                size = len(data)
            room = BUFFER_LIMIT - len(self._pending)
            if room < size:
                self.dropped += size - max(room, 0)
            if room > 0:
                self._pending += data[:room]
                self._start_writer()
                if self._idle:
                    self._data.notify()

    def _within_rate(self, data: bytes | memoryview) -> bytes | memoryview:
        """What of ``data`` the rate allows now (the tail kept for error reports sees it all)."""
        assert self._limit is not None
        now = self._clock()
        allowed = min(len(data), max(int(self._limit.available(now)), 0))
        self._limit.spend(allowed, now)
        self.rate_limited += len(data) - allowed
        return data[:allowed]

    def _remember(self, data: bytes | memoryview) -> None:
        """Keep the last TAIL_BYTES: lines are only split when someone asks for them."""
        self._tail += data[-TAIL_BYTES:]
        if len(self._tail) > 2 * TAIL_BYTES:  # trimmed now and then: amortised O(1) per byte
            del self._tail[:-TAIL_BYTES]

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_out, name="console-output", daemon=True)
            self._writer.start()

    def _write_out(self) -> None:
        """The writer thread: hands buffered bytes to the sink; ends after a quiet second."""
        enter_role(Role.CONSOLE)
        sink = self._sink
        assert sink is not None
        while True:
            with self._lock:
                if not self._pending:
                    self._idle = True
                    self._data.wait(WRITER_IDLE_SECONDS)
                    self._idle = False
                if not self._pending:
                    self._writer = None
                    self._drained.notify_all()
                    return
                self._writing = True
            time.sleep(GATHER_SECONDS)
            with self._lock:
                chunk, self._pending = bytes(self._pending), bytearray()
            try:
                sink.write(chunk)
                sink.flush()
            except Exception as error:  # noqa: BLE001 - a broken sink must not end the output
                self._sink_failed(error)
            finally:
                with self._lock:
                    self._writing = False
                    self._drained.notify_all()

    def _sink_failed(self, error: Exception) -> None:
        self.sink_errors += 1
        if self.sink_errors == 1:
            log.warning("console output failed (%s); the guest goes on", error)

    def flush(self) -> None:
        """Wait (a bounded time) until the writer has handed everything to the sink."""
        with self._lock:
            self._drained.wait_for(lambda: not self._pending and not self._writing, FLUSH_TIMEOUT_SECONDS)
        if self._sink is not None:
            with contextlib.suppress(OSError, ValueError):
                self._sink.flush()

    def last_lines(self) -> list[str]:
        with self._lock:
            tail = bytes(self._tail[-TAIL_BYTES:])
        lines = tail.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()  # the output ended with a newline: no partial line
        if len(tail) >= TAIL_BYTES and len(lines) > 1:
            lines.pop(0)  # probably cut in the middle
        return [line.decode("utf-8", "replace").rstrip("\r") for line in lines[-self._keep_lines :]]


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


__all__ = ["ConsoleOutput", "ConsoleSink", "FileSink", "InputPump", "terminal_input_mode"]
