"""The Debian image's recipe, its failure mode, and the distro scenarios' two ends (no lab needed)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmpy.lab import LabError, distro
from kvmpy.lab.debian import cache_dir
from kvmpy.lab.distro_scenarios import (
    DEVICE_ERRORS,
    PING_FLOOD,
    STREAMS,
    DistroFacts,
    distro_scenario,
    guest_command,
)
from kvmpy.lab.image import encode_command
from kvmpy.lab.scenarios import DEVICE_ERROR_LINES, ScenarioResult, _matching_lines

ROOT = Path(__file__).resolve().parents[1]
#: A mirror nothing answers on (the discard port on this machine): debootstrap fails at once.
DEAD_MIRROR = "http://127.0.0.1:9/debian"
#: x86 Linux keeps at most this much of the kernel command line (COMMAND_LINE_SIZE).
KERNEL_CMDLINE_MAX = 2048

needs_debootstrap = pytest.mark.skipif(
    shutil.which("debootstrap") is None or os.geteuid() != 0, reason="needs debootstrap and root"
)


def test_image_key_follows_every_input(monkeypatch: pytest.MonkeyPatch) -> None:
    key = distro.image_key()
    assert distro.image_key() == key
    assert distro.image_key("trixie") != key
    assert distro.image_key(kernel="linux-image-6.1.0-58-amd64_6.1.193-1_amd64.deb") != key
    monkeypatch.setattr(distro, "PACKAGES", (*distro.PACKAGES, "python3"))
    assert distro.image_key() != key
    monkeypatch.undo()
    monkeypatch.setattr(distro, "FILES", ((*distro.FILES[0][:1], "#!/bin/sh\n", 0o755), *distro.FILES[1:]))
    assert distro.image_key() != key


def test_configure_enables_the_command_unit_and_masks_the_gettys(tmp_path: Path) -> None:
    (tmp_path / "usr/share/doc/bash").mkdir(parents=True)
    (tmp_path / "usr/share/doc/bash/README").write_text("x")
    distro.configure(tmp_path)
    unit = tmp_path / "etc/systemd/system/multi-user.target.wants/kvmpy-command.service"
    assert "ExecStart=/usr/local/sbin/kvmpy-command" in unit.read_text()  # the link resolves
    assert os.readlink(tmp_path / "etc/systemd/system/serial-getty@.service") == "/dev/null"
    assert (tmp_path / "usr/local/sbin/kvmpy-command").stat().st_mode & 0o111
    assert list((tmp_path / "usr/share/doc").iterdir()) == []


@needs_debootstrap
def test_debootstrap_failure_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LabError) as caught:
        distro.debootstrap("bookworm", DEAD_MIRROR, tmp_path / "root")
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"debootstrap bookworm from {DEAD_MIRROR} failed: ")


@needs_debootstrap
def test_image_distro_command_fails_with_one_line() -> None:
    # trixie: no image of it is cached, so debootstrap runs (bookworm's may be in the cache)
    done = subprocess.run(
        [sys.executable, "-m", "kvmpy", "image", "distro", "--release", "trixie", "--mirror", DEAD_MIRROR],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [done.stderr.strip()], done.stderr
    expected = f"kvmpy: error: debootstrap trixie from {DEAD_MIRROR} failed: E: "
    assert done.stderr.startswith(expected), done.stderr
    assert not list((cache_dir() / "distro").glob("debian-trixie-*"))  # nothing half-built is kept


def test_guest_command_fits_the_kernel_command_line(tmp_path: Path) -> None:
    scenario = distro_scenario("d", "kvmpy", "/k", "/i", tmp_path / "root.ext4")
    assert len(f"{scenario.kernel_args} {encode_command(scenario.command)}") < KERNEL_CMDLINE_MAX
    assert "kvmpy.root=/dev/vda" in scenario.kernel_args


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_tcp_sink_checksums_closed_and_open_connections(tmp_path: Path) -> None:
    out, port = tmp_path / "received", _free_port()
    sink = subprocess.Popen(
        [sys.executable, "-m", "kvmpy.lab.tcp_sink", "127.0.0.1", str(port), str(out)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        assert sink.stdout is not None and b"listening" in sink.stdout.readline()
        payload = os.urandom(3 << 20)
        with socket.create_connection(("127.0.0.1", port)) as whole:
            whole.sendall(payload)
        deadline = time.monotonic() + 10
        while not out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        partial = socket.create_connection(("127.0.0.1", port))
        partial.sendall(b"x" * 1000)
        time.sleep(0.5)
        sink.send_signal(signal.SIGTERM)
        assert sink.wait(timeout=10) == 0
        partial.close()
    finally:
        sink.kill()
    lines = out.read_text().splitlines()
    assert lines == [
        f"RECEIVED {hashlib.md5(payload).hexdigest()} {len(payload)} closed",
        f"RECEIVED {hashlib.md5(b'x' * 1000).hexdigest()} 1000 open",
    ]


def _result(output: str, notes: list[str]) -> ScenarioResult:
    return ScenarioResult("d", 0, 1, 50.0, 60.0, output, notes=notes)


def test_facts_show_a_stalled_stream() -> None:
    """Issue 13's failure as this scenario reports it: a short stream, an nc timeout, the driver's error."""
    output = "\n".join(
        [
            "SYSTEMD=degraded",
            "FAILED-UNITS: e2scrub_reap.service",
            "GUEST-MD5 " + "a" * 32 + " 2097152",
            "NC-EXIT a 1",
            "VIRTIO-PROBLEM [ 80.1] virtio_net virtio1: output.0:id 2 is not a head!",
            "GUEST-DONE",
        ]
    )
    verify = ["$ verify", "RECEIVED " + "b" * 32 + " 1530000 open", "HOST-BLK " + "c" * 32, "FSCK-EXIT 0"]
    notes = ["\n".join(verify) + "\n(exit 0)"]
    facts = DistroFacts.parse(_result(output, notes))
    assert facts.systemd_state == "degraded" and facts.failed_units == "e2scrub_reap.service"
    assert facts.broken_streams == ["open after 1530000 bytes"]
    assert facts.nc_failures == ["a 1"]
    assert facts.received != facts.sent and sum(facts.sent.values()) == 1
    assert facts.virtio_problems == ["[ 80.1] virtio_net virtio1: output.0:id 2 is not a head!"]
    assert facts.blk == ("", "", "c" * 32) and facts.fsck_exit == "0" and facts.done


def test_guest_command_sends_every_stream() -> None:
    command, streams = guest_command(), sum(len(round_) for round_ in STREAMS)
    assert command.count("\nblob ") == command.count("send ") == streams
    assert "send 0 c & send 1 d & send 0 e & send 1 f & wait" in command  # both vCPUs at once
    assert f"ping -q -f -c {PING_FLOOD}" in command


def test_device_errors_come_from_the_whole_console() -> None:
    console = "\n".join(["boot"] * 500 + ["[ 400.4] virtio_net virtio1: output.0:id 15 is not a head!"] * 30)
    lines = _matching_lines(console, DEVICE_ERRORS)
    assert lines == ["[ 400.4] virtio_net virtio1: output.0:id 15 is not a head!"] * DEVICE_ERROR_LINES
    assert _matching_lines(console, ()) == []
