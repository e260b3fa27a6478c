"""Boot the test guests under kvmpy on this machine's /dev/kvm.

These are the foundation's end-to-end checks: real guest code, real exits,
counted. They skip with a reason where /dev/kvm or the guest toolchain is
missing.
"""

from __future__ import annotations

import io
import signal
import time
from pathlib import Path

import pytest

from kvmpy.testing.process import kvmpy, start_kvmpy
from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
from kvmpy.vmm.runner import run_vm
from kvmpy.vmm.stats_report import format_stats
from kvmpy.vmm.stop import StopKind

pytestmark = pytest.mark.kvm

ROOT = Path(__file__).resolve().parents[1]


def boot(guest: Path, cmdline: str = "", **options: object):  # type: ignore[no-untyped-def]
    sink = io.BytesIO()
    config = VmConfig(kernel=guest, cmdline=cmdline, serial=SerialConfig(SerialMode.NONE), **options)  # type: ignore[arg-type]
    result = run_vm(config, serial_sink=sink)
    return result, sink.getvalue().decode("utf-8", "replace")


def test_hello_prints_and_exits_with_its_status(guests: Path) -> None:
    done = kvmpy("run", "--kernel", str(guests / "hello.elf"), "--cmdline", "exit=7 greeting")
    assert done.returncode == 7, done.stderr
    assert "Hello from a kvmpy test guest!" in done.stdout
    assert "exit=7 greeting" in done.stdout


def test_port_io_exits_are_counted_exactly(guests: Path) -> None:
    result, output = boot(guests / "pio_storm.elf", "count=10000")
    assert result.reason.kind is StopKind.DEBUG_EXIT and result.reason.status == 0, output
    post = result.stats.device("post-code (0x80)")
    assert post.writes == 10000
    assert post.reads == 0
    io_exits = next(r for r in result.stats.reasons if r.reason == "io")
    assert io_exits.count >= 10000


def test_port_reads_are_counted(guests: Path) -> None:
    result, _ = boot(guests / "pio_storm.elf", "count=2500 in=1")
    assert result.stats.device("post-code (0x80)").reads == 2500


@pytest.mark.parametrize("direction", ["out", "in"])
def test_string_io_is_counted_per_access(guests: Path, direction: str) -> None:
    """REP OUTSB / REP INSB: KVM may hand several accesses over in one exit; each is a device access."""
    result, output = boot(guests / "pio_storm.elf", f"count=1000 rep=1 in={int(direction == 'in')}")
    assert result.reason.status == 0 and "pio_storm done 1000" in output, output
    post = result.stats.device("post-code (0x80)")
    if direction == "out":
        assert (post.writes, post.reads) == (1000, 0)
    else:
        assert (post.writes, post.reads) == (0, 1000)
        assert "pio_storm read 0x0000000000000000" in output  # POST code 0, read back
    io_exits = next(r for r in result.stats.reasons if r.reason == "io")
    assert 1 <= io_exits.count <= 1000 + 100  # the 1000 accesses, the console's few exits
    assert post.handle_ns > 0  # the exits' time reaches the device on the string path too


def test_mmio_exits_are_counted(guests: Path) -> None:
    result, output = boot(guests / "mmio_storm.elf", "count=3000")
    assert result.reason.status == 0, output
    assert dict(result.stats.unhandled_mmio)[0xD0000000] == 3000
    mmio = next(r for r in result.stats.reasons if r.reason == "mmio")
    assert mmio.count == 3000


def test_stats_table_from_the_command_line(guests: Path) -> None:
    done = kvmpy("run", "--kernel", str(guests / "pio_storm.elf"), "--cmdline", "count=10000", "--stats")
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stderr.splitlines() if line.startswith("post-code (0x80)"))
    assert row.split()[-3] == "10000"  # writes column (reads, writes, bytes, us)


def test_memory_touch(guests: Path) -> None:
    result, output = boot(guests / "memtouch.elf", "mib=64", memory=128 << 20)
    assert result.reason.status == 0, output
    assert "memtouch ok 64 MiB" in output


def test_hlt_with_in_kernel_lapic_timer(guests: Path) -> None:
    result, output = boot(guests / "hlt.elf", "count=5")
    assert result.reason.status == 0, output
    assert "hlt woke 5 times" in output


def test_several_vcpus_boot(guests: Path) -> None:
    result, output = boot(guests / "hello.elf", "exit=0", cpus=4)
    assert result.reason.kind is StopKind.DEBUG_EXIT, output
    assert len(result.stats.vcpus) == 4


def test_triple_fault_is_reported_with_registers(guests: Path) -> None:
    done = kvmpy("run", "--kernel", str(guests / "fault.elf"))
    assert done.returncode == 1
    assert "triple fault" in done.stderr
    assert "rip=" in done.stderr
    assert "about to triple fault" in done.stderr  # the last console lines
    assert "Traceback" not in done.stderr


def test_unclaimed_io_is_answered_and_reported(guests: Path) -> None:
    done = kvmpy("run", "--kernel", str(guests / "badio.elf"), "--stats")
    assert done.returncode == 0, done.stderr
    assert "unclaimed port 0x1234" in done.stderr
    assert "unclaimed MMIO 0xd0001000" in done.stderr
    assert "ffffffff" in done.stdout.lower()


def test_ctrl_c_stops_the_vm_quickly(guests: Path) -> None:
    process = start_kvmpy("run", "--kernel", str(guests / "hlt.elf"), "--cmdline", "count=1000000000")
    try:
        time.sleep(3)
        assert process.poll() is None, process.communicate()
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=10)  # the CI run of 2026-12-01 hung here once
        assert time.monotonic() - started < 2.0
        assert process.returncode == 130, err
        assert "Traceback" not in err
    finally:
        if process.poll() is None:  # never leave a VM running behind a failed test
            process.kill()
            process.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--kernel", "/nonexistent"], "does not exist"),
        (["--kernel", "/etc/hostname"], "neither"),
        (["--kernel", "HELLO", "--memory", "1M"], "too small"),
        (["--kernel", "HELLO", "--memory", "64T"], "more than this host has"),
        (["--kernel", "HELLO", "--memory", "lots"], "invalid --memory"),
        (["--kernel", "HELLO", "--serial", "tcp:1"], "invalid --serial"),
    ],
)
def test_bad_input_is_one_line(guests: Path, args: list[str], message: str) -> None:
    args = [str(guests / "hello.elf") if a == "HELLO" else a for a in args]
    done = kvmpy("run", *args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


@pytest.mark.parametrize("direct", [False, True], ids=["page-cache", "o-direct"])
def test_ring3_virtio_blk_driver(guests: Path, tmp_path: Path, direct: bool) -> None:
    """A minimal driver in the guest kit drives virtio-blk; kicks go through ioeventfd."""
    from kvmpy.vmm.config import DiskConfig

    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(bytes([sector]) * 512 for sector in range(64)))
    disk = DiskConfig(image, direct=direct)
    result, output = boot(guests / "virtio_blk.elf", "reads=50", disks=(disk,))
    assert result.reason.status == 0, output
    assert "virtio_blk ok, capacity 64 sectors" in output
    assert image.read_bytes()[5 * 512 : 6 * 512] == b"\xa5" * 512  # the guest's write reached the file
    bar0 = result.stats.device("virtio-blk0 BAR0")
    assert bar0.reads + bar0.writes < 30  # only set-up: 53 requests cost no exits


def test_a_rate_limited_disk_holds_its_rate(guests: Path, tmp_path: Path) -> None:
    """53 requests at 50 a second (a bucket of 5 refilled every 100 ms): about a second, where
    the same guest unlimited takes a tenth of that; the throttled queue waits on a timerfd."""
    import time

    from kvmpy.vmm.config import DiskConfig, RateLimiterConfig, TokenBucketConfig

    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(bytes([sector]) * 512 for sector in range(64)))
    limit = RateLimiterConfig(ops=TokenBucketConfig(size=5, refill_time_ms=100))
    disk = DiskConfig(image, rate_limiter=limit)
    started = time.monotonic()
    result, output = boot(guests / "virtio_blk.elf", "reads=50", disks=(disk,))
    elapsed = time.monotonic() - started
    assert result.reason.status == 0, output
    assert "virtio_blk ok" in output
    assert 0.9 <= elapsed < 20


def test_console_exits_serial_vs_virtio(guests: Path) -> None:
    """The lecture's point in numbers: one exit per byte (the LSR poll; KVM buffers the THR
    write in its coalesced ring) against none per request."""
    serial, serial_out = boot(guests / "serial_flood.elf", "bytes=16384")
    virtio, virtio_out = boot(guests / "virtio_console.elf", "bytes=16384", console="virtio")
    assert "serial_flood sent 16384" in serial_out and "virtio_console sent 16384" in virtio_out
    assert virtio_out.count("x") >= 16384
    uart = serial.stats.device("serial (COM1)")
    assert uart.writes >= 16384 and uart.reads >= 16384
    assert serial.stats.total_exits > 16384
    assert sum(v.coalesced for v in serial.stats.vcpus) > 16000  # the THR writes did not exit
    assert virtio.stats.total_exits < 200


def test_guest_scribbling_over_its_rings(guests: Path, tmp_path: Path) -> None:
    """Garbage rings mark the device DEVICE_NEEDS_RESET; the VMM goes on and ends the VM cleanly."""
    from kvmpy.vmm.config import DiskConfig

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 * 512))
    result, output = boot(guests / "virtio_scribble.elf", "", disks=(DiskConfig(image),))
    assert result.reason.kind is StopKind.DEBUG_EXIT and result.reason.status == 0, output
    assert "device status 0x000000000000004f" in output
    assert image.read_bytes() == bytes(64 * 512)
    counters = dict(result.stats.counters)  # the metrics registry, as --stats prints it
    assert dict(counters["virtio-blk0"])["guest_errors"] >= 1
    assert "virtio-blk0   guest_errors" in format_stats(result.stats)


def test_pci_address_writes_are_coalesced(guests: Path, tmp_path: Path) -> None:
    """Writes to 0xCF8 wait in KVM's coalesced ring: no exit, replayed before the data access."""
    from kvmpy.vmm.config import DiskConfig

    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(bytes([sector]) * 512 for sector in range(64)))
    result, output = boot(guests / "virtio_blk.elf", "reads=1", disks=(DiskConfig(image),))
    assert result.reason.status == 0, output
    assert "virtio_blk ok" in output  # config space read correctly after replayed address writes
    latch = result.stats.device("pci-config (0xcf8)")
    coalesced = sum(v.coalesced for v in result.stats.vcpus)
    address_exits = sum(v.ports.get(0xCF8, 0) for v in result.stats.vcpus)
    serial_exits = sum(v.ports.get(0x3F8, 0) for v in result.stats.vcpus)
    assert serial_exits < 10  # its console bytes were buffered too (the ring filling up exits)
    assert coalesced > 20 and latch.writes + result.stats.device("serial (COM1)").writes >= coalesced
    assert address_exits < coalesced  # reads of 0xCF8 still exit; its dword writes did not


def test_console_on_a_unix_socket(guests: Path, tmp_path: Path) -> None:
    """--serial unix:PATH: kvmpy waits for a client, which types at the guest and reads its replies."""
    import socket

    path = tmp_path / "console.sock"
    process = start_kvmpy("run", "--kernel", str(guests / "serial_echo.elf"), "--serial", f"unix:{path}")
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(path))
        client.settimeout(30)
        received = b""
        while b"serial_echo ready" not in received:
            received += client.recv(4096)
        client.sendall(b"over the socket\n")
        while b"echo: over the socket" not in received:
            received += client.recv(4096)
        client.sendall(b"quit\n")
        while chunk := client.recv(4096):  # EOF once the VM is gone
            received += chunk
        client.close()
        assert process.wait(timeout=30) == 7
    finally:
        process.kill()
        process.wait()
    assert process.stdout is not None and process.stdout.read() == ""  # nothing leaked to stdout
    assert not path.exists()


def test_console_socket_path_that_is_not_a_socket(guests: Path, tmp_path: Path) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("keep me")
    done = kvmpy("run", "--kernel", str(guests / "hello.elf"), "--serial", f"unix:{taken}")
    assert (
        done.returncode != 0
        and "is not a socket" in done.stderr
        and len(done.stderr.strip().splitlines()) == 1
    )
    assert taken.read_text() == "keep me"


def test_lab_scenario_watchdog_ends_a_guest_that_never_finishes(guests: Path) -> None:
    """The scenario runner the lab batches use: a silent guest is killed at its timeout."""
    from kvmpy.lab.scenarios import Scenario, run_scenario

    waiting = run_scenario(
        Scenario("echo", str(guests / "serial_echo.elf"), None, "x", memory="64M", timeout=3)
    )
    assert waiting.status == -signal.SIGKILL and "killed after 3 s" in waiting.stderr
    assert "serial_echo ready" in waiting.output and 3 <= waiting.wall_seconds < 30
    hello = run_scenario(Scenario("hello", str(guests / "hello.elf"), None, "x", memory="64M"))
    assert hello.status == 0 and "Hello from a kvmpy test guest!" in hello.output


def test_a_guest_error_on_a_vcpu_exit_is_contained(guests: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Device code that blames the guest (GuestError) costs a count and a log line, not the VM."""
    from kvmpy.devices.legacy.port_sinks import PostCode
    from kvmpy.errors import GuestError

    def refuse(self: object, offset: int, data: bytes) -> None:
        raise GuestError("the guest wrote something this device refuses")

    monkeypatch.setattr(PostCode, "write", refuse)
    result, output = boot(guests / "pio_storm.elf", "count=100")
    assert result.reason.kind is StopKind.DEBUG_EXIT and result.reason.status == 0, output
    assert "pio_storm done 100" in output
    assert sum(vcpu.guest_errors for vcpu in result.stats.vcpus) == 100


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_hostile_guest_attacks_every_device_and_the_vm_ends_cleanly(
    guests: Path, tmp_path: Path, seed: int
) -> None:
    """Garbage on every port, PCI BARs over RAM and each other, MSI-X and virtio registers of
    every size, rings outside RAM: the VM goes on, ends with the guest's own status, and a
    well-behaved driver reads the disk after resetting the device."""
    from kvmpy.vmm.config import DiskConfig

    image = tmp_path / "disk.img"
    image.write_bytes(b"KVMPY-HOSTILE-SECTOR".ljust(64 * 512, b"\0"))
    before = image.read_bytes()
    result, output = boot(guests / "hostile.elf", f"seed={seed}", disks=(DiskConfig(image),))
    assert "hostile: recovered, sector 0 read back" in output, output[-2000:]
    assert result.reason.kind is StopKind.DEBUG_EXIT and result.reason.status == 0, result.reason
    assert image.read_bytes() == before  # the garbage wrote nothing to the disk
    counters = dict(dict(result.stats.counters)["virtio-blk0"])
    assert counters["guest_errors"] >= 1  # the device was marked as needing reset, and recovered
    assert dict(dict(result.stats.counters)["pci"])["refused_bars"] >= 1


def test_rate_limits_from_the_command_line(guests: Path, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"".join(bytes([sector]) * 512 for sector in range(64)))
    done = kvmpy(
        "run", "--kernel", str(guests / "virtio_blk.elf"), "--cmdline", "reads=60",
        "--disk", f"{image},ops=20", "--stats",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    row = next(line for line in done.stderr.splitlines() if "throttled" in line)
    assert row.split()[0] == "virtio-blk0" and int(row.split()[-1]) > 0  # the registry counted waits
    bad = kvmpy("run", "--kernel", str(guests / "virtio_blk.elf"), "--disk", f"{image},ops=-1")
    assert bad.returncode == 2 and "ops must be at least 1" in bad.stderr
