"""Live migration, the source side: pre-copy rounds while the guest runs, then a short pause.

1. START and CONFIG: the destination builds an empty machine of the same shape.
2. Round 0 sends all RAM that is not zeros (the destination's RAM starts zeroed); later
   rounds send the pages written meanwhile (KVM's dirty log and the VMM's own writes).
3. When the pages left would take no longer than the downtime budget at the last
   round's rate (or a round or time limit is hit: then ``on_limit`` decides), the guest
   pauses, the last dirty pages and the state sections go, and COMPLETE waits for the
   destination to run the guest.

Any failure sends ABANDON (best effort), resumes the guest if this side paused it, and
raises MigrationError: the source never loses its guest.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmpy.memory.guest_memory import PAGE_SIZE, is_zeros
from kvmpy.state.machine_state import describe_machine, save_machine
from kvmpy.state.migration_protocol import (
    PAGES_HEADER,
    VERSION,
    Channel,
    Kind,
    MigrationError,
    checking_memory,
    memory_digest,
    parse_address,
)
from kvmpy.state.snapshot_file import encode

if TYPE_CHECKING:
    from kvmpy.vmm.machine import Machine

#: Pages per MEMORY message (4 MiB).
RUN_PAGES = 1024
CONNECT_TIMEOUT = 10.0
#: How long a refused or missing destination is tried again (it may be starting).
CONNECT_RETRY_SECONDS = 2.0
#: How long the source waits for any answer from the destination.
ANSWER_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class MigrationLimits:
    downtime_budget: float = 0.3
    max_rounds: int = 30
    max_seconds: float = 300.0
    #: When a limit is hit before the budget is met: "pause" finishes anyway, "cancel" gives up.
    on_limit: str = "pause"


@dataclass
class MigrationReport:
    rounds: int = 0
    bytes_sent: int = 0
    pages_sent: int = 0
    total_seconds: float = 0.0
    #: From the source's pause to the destination's first KVM_RUN (same host clock).
    downtime_seconds: float | None = None
    round_pages: list[int] = field(default_factory=list)
    note: str = ""


Progress = Callable[[MigrationReport, int], None]


def migrate(
    machine: Machine,
    destination: str,
    limits: MigrationLimits = MigrationLimits(),
    progress: Progress | None = None,
) -> MigrationReport:
    """Send the running ``machine`` to ``destination``; on success the caller stops it."""
    channel = _connect(destination)
    report = MigrationReport()
    paused_here = False
    started = time.monotonic()
    try:
        _handshake(channel, machine)
        machine.start_dirty_tracking()
        _send_all(channel, machine, report, progress)
        paused_here = _converge(channel, machine, limits, report, started, progress)
        _finish(channel, machine, report)
        report.total_seconds = time.monotonic() - started
        return report
    except BaseException as error:
        _abandon(channel, str(error))
        if paused_here:
            machine.resume()
        machine.stop_dirty_tracking()
        if isinstance(error, MigrationError):
            raise
        raise MigrationError(f"migration to {destination} failed: {error}") from None
    finally:
        channel.close()


def _connect(destination: str) -> Channel:
    family, address, text = parse_address(destination)
    deadline = time.monotonic() + CONNECT_RETRY_SECONDS
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(address)  # type: ignore[arg-type]
            break
        except (ConnectionRefusedError, FileNotFoundError) as error:
            sock.close()  # a destination between bind() and listen(), or about to bind: try again
            if time.monotonic() > deadline:
                raise MigrationError(f"cannot reach {text}: {error.strerror or error}") from None
            time.sleep(0.05)
        except OSError as error:
            sock.close()
            raise MigrationError(f"cannot reach {text}: {error.strerror or error}") from None
    sock.settimeout(ANSWER_TIMEOUT)
    return Channel(sock, text)


def _handshake(channel: Channel, machine: Machine) -> None:
    channel.send(Kind.START, VERSION.to_bytes(4, "little"))
    channel.expect(Kind.ACK)
    channel.send(Kind.CONFIG, encode(describe_machine(machine)))
    channel.expect(Kind.ACK)


def _send_all(channel: Channel, machine: Machine, report: MigrationReport, progress: Progress | None) -> None:
    """Round 0: every run of pages that is not all zeros."""
    machine.take_dirty_pages()  # what is written from here on goes in the next rounds
    total = 0
    for index, region in enumerate(machine.memory):
        pages = region.size // PAGE_SIZE
        for first in range(0, pages, RUN_PAGES):
            count = min(RUN_PAGES, pages - first)
            data = region.view[first * PAGE_SIZE : (first + count) * PAGE_SIZE]
            if is_zeros(data):
                continue
            _send_run(channel, index, first, count, data)
            total += count
            if progress is not None:
                progress(report, total)
    _end_round(channel, report, total)


def _converge(
    channel: Channel,
    machine: Machine,
    limits: MigrationLimits,
    report: MigrationReport,
    started: float,
    progress: Progress | None,
) -> bool:
    """Dirty rounds until the rest fits the budget; returns True once the guest is paused here."""
    while True:
        dirty = machine.take_dirty_pages()
        count = sum(len(pages) for pages in dirty)
        elapsed = time.monotonic() - started
        rate = report.bytes_sent / max(elapsed, 1e-3)
        estimate = count * PAGE_SIZE / max(rate, 1.0)
        limited = report.rounds >= limits.max_rounds or elapsed >= limits.max_seconds
        if estimate <= limits.downtime_budget or limited:
            if limited and estimate > limits.downtime_budget:
                if limits.on_limit == "cancel":
                    raise MigrationError(
                        f"no convergence after {report.rounds} rounds ({estimate * 1000:.0f} ms left)"
                    )
                report.note = f"limit reached after {report.rounds} rounds; paused with {count} pages left"
            machine.pause()
            _send_pages(channel, machine, dirty, report, progress)
            return True
        _send_pages(channel, machine, dirty, report, progress)


def _send_pages(
    channel: Channel,
    machine: Machine,
    dirty: list[list[int]],
    report: MigrationReport,
    progress: Progress | None,
) -> None:
    total = 0
    for index, pages in enumerate(dirty):
        view = machine.memory.regions[index].view
        for first, count in _runs(pages):
            _send_run(channel, index, first, count, view[first * PAGE_SIZE : (first + count) * PAGE_SIZE])
            total += count
            if progress is not None:
                progress(report, total)
    _end_round(channel, report, total)


def _finish(channel: Channel, machine: Machine, report: MigrationReport) -> None:
    paused_at = time.monotonic()
    _send_pages(channel, machine, machine.take_dirty_pages(), report, None)  # written while pausing
    channel.send(Kind.STATE, encode(save_machine(machine)))
    channel.expect(Kind.ACK)
    check = memory_digest(machine.memory.regions) if checking_memory() else b""
    channel.send(Kind.COMPLETE, check)
    answer = channel.expect(Kind.ACK)
    if len(answer) == 8:
        resumed_at = int.from_bytes(answer, "little") / 1e9
        report.downtime_seconds = max(resumed_at - paused_at, 0.0)
    report.bytes_sent = channel.sent


def _send_run(channel: Channel, region: int, first: int, count: int, data: memoryview) -> None:
    channel.send(Kind.MEMORY, PAGES_HEADER.pack(region, first, count) + bytes(data))


def _end_round(channel: Channel, report: MigrationReport, pages: int) -> None:
    channel.send(Kind.ROUND_END)
    channel.expect(Kind.ACK)
    report.rounds += 1
    report.pages_sent += pages
    report.round_pages.append(pages)
    report.bytes_sent = channel.sent


def _runs(pages: list[int]) -> Iterator[tuple[int, int]]:
    """Sorted page numbers as (first, count) runs of at most RUN_PAGES."""
    first = previous = -2
    count = 0
    for page in pages:
        if page == previous + 1 and count < RUN_PAGES:
            count += 1
        else:
            if count:
                yield first, count
            first, count = page, 1
        previous = page
    if count:
        yield first, count


def _abandon(channel: Channel, why: str) -> None:
    try:
        channel.send(Kind.ABANDON, why.encode()[:4096])
    except MigrationError:
        pass


__all__ = ["MigrationLimits", "MigrationReport", "migrate"]
