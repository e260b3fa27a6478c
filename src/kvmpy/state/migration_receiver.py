"""Live migration, the destination side: build, fill, restore, run, or discard on any failure.

Everything the source sends is untrusted input, as a snapshot file is: the
machine description is checked before anything is built, every page run
must lie inside a region, the state sections are validated by the same
restore code as a snapshot's. Any error or an ABANDON discards the machine
built so far: nothing half migrated ever runs.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING

from kvmpy.memory.guest_memory import PAGE_SIZE
from kvmpy.state.machine_state import (
    MachineDescription,
    config_for_restore,
    read_description,
    restore_machine,
)
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
from kvmpy.state.snapshot_file import Section, decode, encode
from kvmpy.vmm.config import SerialConfig

if TYPE_CHECKING:
    from kvmpy.vmm.console import ConsoleSink
    from kvmpy.vmm.machine import Machine

#: How long the destination waits for the source to connect, and then for each message.
ACCEPT_TIMEOUT = 600.0
MESSAGE_TIMEOUT = 120.0

log = logging.getLogger("kvmpy.state")


def listen(address: str) -> tuple[socket.socket, str]:
    family, bound, text = parse_address(address)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_UNIX:
            path = str(bound)
            if os.path.exists(path):
                os.unlink(path)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(bound)  # type: ignore[arg-type]
        sock.listen(1)
    except OSError as error:
        sock.close()
        raise MigrationError(f"cannot listen on {text}: {error.strerror or error}") from None
    return sock, text


def receive(
    listener: socket.socket, text: str, serial: SerialConfig, serial_sink: ConsoleSink | None
) -> Machine:
    """Accept one source and return the machine it sent, started (its vCPUs running)."""
    listener.settimeout(ACCEPT_TIMEOUT)
    try:
        sock, peer = listener.accept()
    except OSError as error:
        raise MigrationError(f"no source connected to {text}: {error.strerror or error}") from None
    finally:
        listener.close()
    sock.settimeout(MESSAGE_TIMEOUT)
    channel = Channel(sock, f"the source ({peer or text})")
    machine: Machine | None = None
    try:
        version = int.from_bytes(channel.expect(Kind.START), "little")
        if version != VERSION:
            raise MigrationError(
                f"the source speaks migration protocol {version}; this kvmpy speaks {VERSION}"
            )
        channel.send(Kind.ACK)
        machine = _build(channel, serial, serial_sink)
        channel.send(Kind.ACK)
        _fill_and_run(channel, machine)
        return machine
    except BaseException as error:
        if machine is not None:
            machine.close()
        try:
            channel.send(Kind.ERROR, str(error).encode()[:4096])
        except MigrationError:
            pass
        if isinstance(error, MigrationError):
            raise
        raise MigrationError(f"incoming migration failed: {error}") from None
    finally:
        channel.close()


def _build(channel: Channel, serial: SerialConfig, serial_sink: ConsoleSink | None) -> Machine:
    from kvmpy.vmm.machine import Machine

    described = decode("machine", channel.expect(Kind.CONFIG), MachineDescription)
    read_description({"machine": Section(1, encode(described))})  # the same checks as a snapshot's
    return Machine(config_for_restore(described, serial), serial_sink=serial_sink)


def _fill_and_run(channel: Channel, machine: Machine) -> None:
    regions = machine.memory.regions
    digest = b""  # of RAM as the source sent it, before restored devices may write to it
    while True:
        frame = channel.receive()
        if frame.kind is Kind.MEMORY:
            _store_pages(machine, regions, frame.payload)
        elif frame.kind is Kind.ROUND_END:
            channel.send(Kind.ACK)
        elif frame.kind is Kind.STATE:
            from kvmpy.state.snapshot_file import decode as decode_section

            sections = decode_section("state", frame.payload, dict[str, Section])
            if checking_memory():
                digest = memory_digest(regions)
            restore_machine(machine, sections)
            channel.send(Kind.ACK)
        elif frame.kind is Kind.COMPLETE:
            if frame.payload:
                _check_memory(digest or memory_digest(regions), frame.payload)
            machine.start()
            resumed_at = time.monotonic_ns()
            channel.send(Kind.ACK, resumed_at.to_bytes(8, "little"))
            return
        elif frame.kind is Kind.ABANDON:
            raise MigrationError(
                f"the source abandoned the migration: {frame.payload.decode(errors='replace')}"
            )
        else:
            raise MigrationError(f"unexpected {frame.kind.name} message during the memory rounds")


def _check_memory(mine: bytes, theirs: bytes) -> None:
    """The source's digest of its paused guest's RAM against this side's, taken when the last
    pages had come and before the devices were restored (a restored vhost ring may take a
    packet at once) (``KVMPY_MIGRATION_CHECK``)."""
    if mine != theirs:
        raise MigrationError("guest RAM differs from the source's at the switch-over (memory digests differ)")
    what = "migration check: guest RAM equal on both sides at the switch-over"
    log.warning("%s (BLAKE2b %s)", what, mine.hex()[:16])


def _store_pages(machine: Machine, regions: tuple, payload: bytes) -> None:  # type: ignore[type-arg]
    if len(payload) < PAGES_HEADER.size:
        raise MigrationError("a MEMORY message too short for its header")
    index, first, count = PAGES_HEADER.unpack_from(payload)
    data = memoryview(payload)[PAGES_HEADER.size :]
    if index >= len(regions):
        raise MigrationError(f"pages for region {index}; the machine has {len(regions)}")
    region = regions[index]
    if len(data) != count * PAGE_SIZE or (first + count) * PAGE_SIZE > region.size:
        raise MigrationError(f"pages {first}+{count} do not fit region {index} ({region.size} bytes)")
    start = first * PAGE_SIZE
    region.view[start : start + len(data)] = data


__all__ = ["listen", "receive"]
