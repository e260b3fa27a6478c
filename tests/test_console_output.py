"""The console's host side: bounded work and memory per byte the guest writes, output handed off
the vCPU thread so a slow consumer costs dropped bytes, not a stalled guest, a capped log file."""

from __future__ import annotations

import io
import re
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from kvmpy.testing.process import kvmpy
from kvmpy.vmm import console
from kvmpy.vmm.console import ConsoleOutput, FileSink


def test_a_burst_of_newlines_costs_bounded_memory_and_time() -> None:
    """4 MiB of "\\n" used to make a bytes object per line before keeping 20: +330 MiB, > 1 s."""
    sink = io.BytesIO()
    output = ConsoleOutput(sink)
    burst = b"x\n" * (2 << 20)
    tracemalloc.start()
    started = time.perf_counter()
    output.write(memoryview(burst))
    elapsed = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < console.BUFFER_LIMIT + (1 << 20)
    assert elapsed < 0.25
    assert output.last_lines() == ["x"] * 20
    output.flush()
    assert sink.getvalue() == burst[: console.BUFFER_LIMIT]  # the rest did not fit: counted
    assert output.dropped == len(burst) - console.BUFFER_LIMIT


def test_last_lines_with_partial_lines_and_carriage_returns() -> None:
    output = ConsoleOutput(None, keep_lines=3)
    for chunk in (b"one\r\ntwo\n", b"thr", b"ee\nfour\nfi", b"ve"):
        output.write(chunk)
    assert output.last_lines() == ["three", "four", "five"]
    for byte in b"a\nb\n":  # the serial port's way: a byte at a time
        output.write(bytes([byte]))
    assert output.last_lines() == ["four", "fivea", "b"]


class StalledSink:
    """A socket client that stopped reading: every write blocks until released."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.received = bytearray()

    def write(self, data: bytes, /) -> int:
        self.release.wait(10)
        self.received += data
        return len(data)

    def flush(self) -> None:
        pass


def test_a_stalled_consumer_does_not_stall_the_writer() -> None:
    sink = StalledSink()
    output = ConsoleOutput(sink)
    chunk = b"y" * 4096
    started = time.perf_counter()
    for _ in range(2 * console.BUFFER_LIMIT // len(chunk)):
        output.write(chunk)  # before: the first write blocked the vCPU thread here
    assert time.perf_counter() - started < 1.0
    assert output.dropped > 0  # held: the writer's one chunk and a full buffer; the rest counted
    sink.release.set()
    output.flush()
    assert len(sink.received) + output.dropped == 2 * console.BUFFER_LIMIT


def test_file_output_stops_at_its_limit_with_a_note(tmp_path: Path) -> None:
    path = tmp_path / "serial.log"
    output = ConsoleOutput(FileSink(path.open("ab"), limit=1000))
    for _ in range(50):
        output.write(b"z" * 100)
    output.flush()
    contents = path.read_bytes()
    assert contents.startswith(b"z" * 1000)
    assert b"console output limit of 1000 bytes reached" in contents[1000:]
    assert len(contents) < 1200


def test_a_rate_limit_lets_a_second_worth_through_then_the_refill() -> None:
    """--console-rate: a guest that prints forever gets its rate through, the rest is counted."""
    now = [100.0]
    sink = io.BytesIO()
    output = ConsoleOutput(sink, rate=1000, clock=lambda: now[0])
    output.write(b"a" * 1500)  # a full bucket holds one second's worth
    now[0] += 0.5
    output.write(b"b" * 800)  # half a second refilled 500
    now[0] += 10.0
    output.write(b"c" * 10)  # refilled to the bucket's size, not ten seconds' worth
    output.flush()
    assert sink.getvalue() == b"a" * 1000 + b"b" * 500 + b"c" * 10
    assert output.rate_limited == 500 + 300
    assert output.bytes_written == 1500 + 800 + 10  # what the guest wrote, all of it
    assert output.last_lines() == ["a" * 1500 + "b" * 800 + "c" * 10][-1:]  # error reports see it all


@pytest.mark.kvm
def test_console_rate_on_the_command_line(guests: Path) -> None:
    """A guest flooding the 16550A under --console-rate: what the terminal did not get is counted."""
    done = kvmpy("run", "--kernel", str(guests / "serial_flood.elf"), "--console-rate", "1K", "--stats")
    assert done.returncode == 0, done.stderr
    counters = dict(re.findall(r"^console\s+(\w+)\s+(\d+)$", done.stderr, re.M))
    flooded = done.stdout.count("x")
    assert 0 < flooded < 65536 and int(counters["rate_limited"]) > 0, done.stderr
    assert flooded + int(counters["rate_limited"]) >= 65536  # every byte sent or counted
