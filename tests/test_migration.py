"""Live migration between two kvmpy processes on this machine's KVM, and failures that keep the source."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from kvmpy.state.migration_protocol import CHECK_MEMORY_ENV, Channel, Kind, MigrationError, parse_address
from kvmpy.testing.console import CapturedConsole, ticks, wait_until
from kvmpy.testing.process import kvmpy, read_until, start_kvmpy
from kvmpy.testing.vmm_client import run_with_client
from kvmpy.vmm import actions as a
from kvmpy.vmm.actions import ActionError, VmState
from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
from kvmpy.vmm.stop import StopKind
from kvmpy.vmm.vmm import Vmm


def _source(guests: Path, console: CapturedConsole) -> Vmm:
    config = VmConfig(kernel=guests / "counter.elf", cmdline="gap=20000000", cpus=2,
                      serial=SerialConfig(SerialMode.NONE))
    vmm = Vmm(config, serial_sink=console)
    vmm.submit(a.StartInstance())
    return vmm


def _wait_for_socket(path: Path) -> None:
    wait_until(path.exists, timeout=20)


def test_a_running_guest_moves_to_another_process_and_keeps_counting(guests: Path, tmp_path: Path) -> None:
    address = tmp_path / "incoming.sock"
    destination = start_kvmpy("run", "--incoming", f"unix:{address}")
    console = CapturedConsole()
    vmm = _source(guests, console)
    reports: list[object] = []

    def client() -> None:
        wait_until(lambda: len(ticks(console.text)) >= 5)
        _wait_for_socket(address)
        reports.append(vmm.submit(a.Migrate(f"unix:{address}")))

    thread = threading.Thread(target=client)
    thread.start()
    result = vmm.run()
    thread.join(30)
    assert result.reason.kind is StopKind.STOPPED and result.reason.status == 0, result.reason
    assert "migrated to" in result.reason.message
    report = reports[0]
    assert isinstance(report, dict) and report["rounds"] >= 2 and report["downtime_seconds"] is not None
    assert vmm.submit(a.GetMigrationStatus()) == report  # answered after the VMM stopped, too
    print(f"migration: {report}")
    after = read_until(destination, lambda text: len(ticks(text)) >= 3)
    destination.terminate()
    _, stderr = destination.communicate(timeout=20)
    seen = ticks(console.text + after)
    assert len(ticks(after)) >= 3 and seen == list(range(1, len(seen) + 1)), f"{seen}\n{stderr}"


def test_the_memory_check_finds_guest_ram_equal_on_both_sides(
    guests: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With KVMPY_MIGRATION_CHECK on the source, the destination compares its RAM with the
    paused source's before it runs the guest, and says so."""
    monkeypatch.setenv(CHECK_MEMORY_ENV, "1")
    address = tmp_path / "incoming.sock"
    destination = start_kvmpy("run", "--incoming", f"unix:{address}")
    console = CapturedConsole()
    vmm = _source(guests, console)

    def client() -> None:
        wait_until(lambda: len(ticks(console.text)) >= 3)
        _wait_for_socket(address)
        vmm.submit(a.Migrate(f"unix:{address}"))

    thread = threading.Thread(target=client)
    thread.start()
    assert vmm.run().reason.status == 0
    thread.join(30)
    read_until(destination, lambda text: len(ticks(text)) >= 2)
    destination.terminate()
    _, stderr = destination.communicate(timeout=20)
    assert "migration check: guest RAM equal on both sides" in stderr, stderr


def test_guest_ram_that_differs_fails_the_destination_and_the_source_goes_on(
    guests: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A digest that does not match (a page lost on the way, here a forged digest) ends the
    destination before it runs anything, and the source resumes its guest."""
    from kvmpy.state import migration_sender

    monkeypatch.setenv(CHECK_MEMORY_ENV, "1")
    monkeypatch.setattr(migration_sender, "memory_digest", lambda regions: b"\x5a" * 32)
    address = tmp_path / "incoming.sock"
    destination = start_kvmpy("run", "--incoming", f"unix:{address}")
    console = CapturedConsole()
    vmm = _source(guests, console)

    def client() -> None:
        wait_until(lambda: len(ticks(console.text)) >= 3)
        _wait_for_socket(address)
        with pytest.raises(ActionError, match="guest RAM differs"):
            vmm.submit(a.Migrate(f"unix:{address}"))
        count = len(ticks(console.text))
        wait_until(lambda: len(ticks(console.text)) >= count + 3)  # resumed, console live

    run_with_client(vmm, client)
    _, stderr = destination.communicate(timeout=30)
    assert destination.returncode != 0
    assert "guest RAM differs" in stderr and "Traceback" not in stderr, stderr


class _DyingDestination(threading.Thread):
    """Accepts, answers START and CONFIG, takes some memory, then drops the connection."""

    def __init__(self, path: Path, frames_before_dying: int) -> None:
        super().__init__(daemon=True)
        family, address, _ = parse_address(f"unix:{path}")
        self.listener = socket.socket(family, socket.SOCK_STREAM)
        self.listener.bind(address)  # type: ignore[arg-type]
        self.listener.listen(1)
        self.frames_before_dying = frames_before_dying
        self.seen: list[Kind] = []

    def run(self) -> None:
        sock, _ = self.listener.accept()
        channel = Channel(sock, "the source")
        try:
            for _ in range(self.frames_before_dying):
                frame = channel.receive()
                self.seen.append(frame.kind)
                if frame.kind in (Kind.START, Kind.CONFIG):
                    channel.send(Kind.ACK)
        except MigrationError:
            pass
        channel.close()


def test_a_destination_that_dies_leaves_the_source_running(guests: Path, tmp_path: Path) -> None:
    dying = _DyingDestination(tmp_path / "dies.sock", frames_before_dying=4)
    dying.start()
    console = CapturedConsole()
    vmm = _source(guests, console)
    errors: list[BaseException] = []

    def client() -> None:
        try:
            wait_until(lambda: len(ticks(console.text)) >= 2)
            with pytest.raises(ActionError, match="closed the connection|lost the connection"):
                vmm.submit(a.Migrate(f"unix:{tmp_path / 'dies.sock'}"))
            assert vmm.submit(a.GetInstanceInfo()).state is VmState.RUNNING  # type: ignore[attr-defined]
            count = len(ticks(console.text))
            wait_until(lambda: len(ticks(console.text)) >= count + 3)  # the console is still live
        except BaseException as error:
            errors.append(error)
        finally:
            vmm.submit(a.Stop())

    thread = threading.Thread(target=client)
    thread.start()
    vmm.run()
    thread.join(30)
    if errors:
        raise errors[0]
    assert dying.seen[:3] == [Kind.START, Kind.CONFIG, Kind.MEMORY]
    status = vmm.submit(a.GetMigrationStatus())
    assert isinstance(status, dict) and status["state"] == "failed" and "connection" in str(status["error"])
    seen = ticks(console.text)
    assert seen == list(range(1, len(seen) + 1))


def test_nothing_listening_is_a_clear_error_and_the_vm_goes_on(guests: Path, tmp_path: Path) -> None:
    console = CapturedConsole()
    vmm = _source(guests, console)

    def client() -> None:
        try:
            with pytest.raises(ActionError, match="cannot reach"):
                vmm.submit(a.Migrate(f"unix:{tmp_path / 'nobody.sock'}"))
            with pytest.raises(ActionError, match="invalid migration address"):
                vmm.submit(a.Migrate("carrier-pigeon:home"))
        finally:
            vmm.submit(a.Stop())

    thread = threading.Thread(target=client)
    thread.start()
    assert vmm.run().reason.kind is StopKind.STOPPED
    thread.join(10)


def test_a_destination_refuses_a_bad_source_with_one_line(tmp_path: Path) -> None:
    address = tmp_path / "incoming.sock"
    destination = start_kvmpy("run", "--incoming", f"unix:{address}")
    _wait_for_socket(address)
    family, path, _ = parse_address(f"unix:{address}")
    sock = socket.socket(family, socket.SOCK_STREAM)
    wait_until(lambda: sock.connect_ex(path) == 0, timeout=20, what="the destination to listen")  # type: ignore[arg-type]
    channel = Channel(sock, "the destination")
    channel.send(Kind.START, (99).to_bytes(4, "little"))
    with pytest.raises(MigrationError, match="protocol 99"):
        channel.expect(Kind.ACK)
    channel.close()
    _, stderr = destination.communicate(timeout=20)
    assert destination.returncode != 0
    assert "protocol 99" in stderr and "Traceback" not in stderr, stderr


def test_the_incoming_address_is_checked(tmp_path: Path) -> None:
    done = kvmpy("run", "--incoming", "nowhere", timeout=30)
    assert done.returncode == 2 and "invalid migration address" in done.stderr, done.stderr
