"""Virtio devices across snapshots and live migration, on this machine's KVM with the test guests.

blk_records writes numbered records to a virtio-blk disk and reads them back (and the one
before), checking every used entry; console_lines keeps a virtio-console busy. Each runs,
is paused and snapshotted (or migrated), and continues in a new process: its numbers go on
without a gap or a repeat, and the disk holds every record the guest said was written.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kvmpy.state.machine_state import VirtioDeviceState
from kvmpy.state.migration_protocol import CHECK_MEMORY_ENV
from kvmpy.state.snapshot_file import Section, decode, encode, read_state_file, write_state_file
from kvmpy.testing.console import CapturedConsole, wait_until
from kvmpy.testing.process import kvmpy, read_until, start_kvmpy
from kvmpy.testing.vmm_client import run_with_client
from kvmpy.vmm import actions as a
from kvmpy.vmm.config import DiskConfig, SerialConfig, SerialMode, VmConfig
from kvmpy.vmm.stop import StopKind
from kvmpy.vmm.vmm import Vmm

SECTOR = 512
DISK_SECTORS = 2048


def _records(text: str) -> list[int]:
    assert "BAD" not in text, text[-500:]
    return [int(n) for n in re.findall(r"record (\d+) ok\n", text)]


def _lines(text: str) -> list[int]:
    assert "BAD" not in text, text[-500:]
    return [int(n) for n in re.findall(r"line (\d+)\n", text)]


def _wait(condition: Callable[[], bool], timeout: float = 60) -> None:
    wait_until(condition, timeout)


def _disk_config(guests: Path, image: Path) -> VmConfig:
    image.write_bytes(bytes(DISK_SECTORS * SECTOR))
    return VmConfig(
        kernel=guests / "blk_records.elf",
        cmdline="gap=2000000",  # short: a request is often in flight when the pause comes
        disks=(DiskConfig(image, id="data"),),
        rng=True,
        serial=SerialConfig(SerialMode.NONE),
    )


def _snapshot(config: VmConfig, directory: Path, ready: Callable[[str], bool]) -> str:
    """Run ``config``, pause it once ``ready(console)``, snapshot it; returns what it printed."""
    console = CapturedConsole()
    vmm = Vmm(config, serial_sink=console)
    vmm.submit(a.StartInstance())

    def client() -> None:
        _wait(lambda: ready(console.text))
        vmm.submit(a.Pause())
        vmm.submit(a.CreateSnapshot(directory / "state", directory / "memory"))

    run_with_client(vmm, client, "snapshot taken")
    return console.text


def _run_restored(directory: Path, enough: Callable[[str], bool]) -> tuple[str, str]:
    process = start_kvmpy("run", "--restore", str(directory))
    after = read_until(process, enough, timeout=60)
    return after + _finish(process), _stderr(process)


def _finish(process: subprocess.Popen[str]) -> str:
    """Terminate ``process`` and read what it wrote after the lines already taken: from its
    text stream, whose buffer may hold more than readline returned (communicate() would
    read past that buffer and lose it)."""
    process.terminate()
    assert process.stdout is not None
    rest = process.stdout.read()
    process.wait(20)
    return rest


def _stderr(process: subprocess.Popen[str]) -> str:
    assert process.stderr is not None
    return process.stderr.read()


def _check_disk(image: Path, last: int) -> None:
    """Every record the guest reported is in its sector (record N in sector 1 + (N-1) % 2047)."""
    data = image.read_bytes()
    for n in range(1, last + 1):
        sector = 1 + (n - 1) % (DISK_SECTORS - 1)
        record = data[sector * SECTOR : (sector + 1) * SECTOR]
        expected = n.to_bytes(8, "little") + bytes((n * 7 + i) & 0xFF for i in range(8, SECTOR))
        assert record == expected, f"record {n} is not in sector {sector}"


@pytest.fixture(scope="module")
def disk_snapshot(guests: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    directory = tmp_path_factory.mktemp("virtio-snapshot")
    config = _disk_config(guests, directory / "disk.img")
    before = _snapshot(config, directory, lambda text: len(_records(text)) >= 10)
    return directory, directory / "disk.img", before


Change = Callable[[VirtioDeviceState], "VirtioDeviceState | bytes"]


def test_disk_records_continue_after_a_restore_in_a_new_process(
    disk_snapshot: tuple[Path, Path, str],
) -> None:
    directory, image, before = disk_snapshot
    sections = read_state_file(directory / "state")
    assert {"device:virtio-blk:data", "device:virtio-rng", "device:serial", "vm", "vcpus"} <= set(sections)
    counted = len(_records(before))
    after, stderr = _run_restored(directory, lambda text: len(_records(text)) >= 10)
    records = _records(before + after)  # a line cut by the pause is finished after the restore
    assert len(records) >= counted + 10, stderr
    assert records == list(range(1, len(records) + 1)), f"{records}\n{stderr}"
    assert "Traceback" not in stderr
    _check_disk(image, records[-1])


def _forge(directory: Path, target: Path, change: Change) -> Path:
    target.mkdir()
    (target / "memory").symlink_to(directory / "memory")
    sections = read_state_file(directory / "state")
    name = "device:virtio-blk:data"
    state = decode(name, sections[name].data, VirtioDeviceState)
    changed = change(state)
    data = changed if isinstance(changed, bytes) else encode(changed)
    write_state_file(target / "state", dict(sections, **{name: Section(sections[name].version, data)}))
    return target


def _transport(**changes: Any) -> Callable[[VirtioDeviceState], VirtioDeviceState]:
    return lambda s: dataclasses.replace(s, transport=dataclasses.replace(s.transport, **changes))


def _ring(**changes: Any) -> Callable[[VirtioDeviceState], VirtioDeviceState]:
    def change(s: VirtioDeviceState) -> VirtioDeviceState:
        queue = dataclasses.replace(s.transport.queues[0], **changes)
        return dataclasses.replace(s, transport=dataclasses.replace(s.transport, queues=(queue,)))

    return change


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("acked", lambda s: _transport(driver_features=s.transport.driver_features | 1 << 50)(s),
         "never offered"),
        ("ring", _ring(device_addr=1 << 40), "used ring 0x10000000000"),
        ("vector", _transport(queue_vectors=(99,)), "MSI-X vectors"),
        ("truncated", lambda s: encode(s)[:40], "section device:virtio-blk:data"),
    ],
)
def test_hostile_virtio_state_is_one_line_and_exit_2(
    disk_snapshot: tuple[Path, Path, str], tmp_path: Path, name: str,
    change: Change, message: str,
) -> None:  # fmt: skip
    bad = _forge(disk_snapshot[0], tmp_path / name, change)
    done = kvmpy("run", "--restore", str(bad), timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_console_lines_continue_after_a_restore(guests: Path, tmp_path: Path) -> None:
    config = VmConfig(
        kernel=guests / "console_lines.elf",
        cmdline="gap=2000000",
        console="virtio",
        serial=SerialConfig(SerialMode.NONE),
    )
    before = _snapshot(config, tmp_path, lambda text: len(_lines(text)) >= 20)
    after, stderr = _run_restored(tmp_path, lambda text: len(_lines(text)) >= 20)
    lines = _lines(before + after)
    assert len(lines) >= len(_lines(before)) + 20, stderr
    assert lines == list(range(1, len(lines) + 1)), f"{lines}\n{stderr}"


def test_disk_records_continue_across_a_live_migration(
    guests: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CHECK_MEMORY_ENV, "1")  # and the destination's RAM is the source's
    address = tmp_path / "incoming.sock"
    destination = start_kvmpy("run", "--incoming", f"unix:{address}")
    console = CapturedConsole()
    image = tmp_path / "disk.img"
    vmm = Vmm(_disk_config(guests, image), serial_sink=console)
    vmm.submit(a.StartInstance())
    reports: list[object] = []

    def client() -> None:
        _wait(lambda: len(_records(console.text)) >= 10)
        _wait(address.exists)
        reports.append(vmm.submit(a.Migrate(f"unix:{address}")))

    thread = threading.Thread(target=client)
    thread.start()
    result = vmm.run()
    thread.join(30)
    assert result.reason.kind is StopKind.STOPPED and result.reason.status == 0, result.reason
    after = read_until(destination, lambda text: len(_records(text)) >= 10, timeout=60)
    rest = _finish(destination)
    stderr = _stderr(destination)
    records = _records(console.text + after + rest)
    assert len(_records(after)) >= 10, stderr
    assert records == list(range(1, len(records) + 1)), f"{records}\n{stderr}"
    assert "migration check: guest RAM equal on both sides" in stderr, stderr
    _check_disk(image, records[-1])


def test_inspect_names_the_disk_image_a_restore_opens(disk_snapshot: tuple[Path, Path, str]) -> None:
    directory, image, _ = disk_snapshot
    done = kvmpy("snapshot", "inspect", str(directory / "state"))
    assert done.returncode == 0, done.stderr
    assert f"PCI slot 1: virtio-blk:data on disk image {image} (read-write)" in done.stdout
    assert "PCI slot 2: virtio-rng" in done.stdout


def test_devices_take_their_saved_slots_whatever_the_order(guests: Path, tmp_path: Path) -> None:
    from kvmpy.vmm.machine import Machine

    for name in ("a", "b"):
        (tmp_path / name).write_bytes(bytes(4096))
    disks = (DiskConfig(tmp_path / "a", id="a"), DiskConfig(tmp_path / "b", id="b"))
    fresh = Machine(VmConfig(kernel=guests / "hello.elf", disks=disks, rng=True))
    try:
        assert fresh.pci.slots() == {"virtio-blk:a": 1, "virtio-blk:b": 2, "virtio-rng": 3}
    finally:
        fresh.close()
    placed = (("virtio-rng", 7), ("virtio-blk:b", 1), ("virtio-blk:a", 4))
    restored = Machine(VmConfig(kernel=guests / "hello.elf", disks=disks, rng=True, pci_slots=placed))
    try:
        assert restored.pci.slots() == dict(placed)
    finally:
        restored.close()


def test_a_snapshot_describes_the_image_a_drive_serves_since_a_patch(guests: Path, tmp_path: Path) -> None:
    from kvmpy.state.machine_state import read_description
    from kvmpy.vmm.config import RateLimiterConfig, TokenBucketConfig

    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first.write_bytes(bytes(4096))
    second.write_bytes(bytes(8192))
    config = VmConfig(kernel=guests / "counter.elf", cmdline="gap=20000000",
                      disks=(DiskConfig(first, id="data"),), serial=SerialConfig(SerialMode.NONE))
    limit = RateLimiterConfig(ops=TokenBucketConfig(100, 1000))

    console = CapturedConsole()
    vmm = Vmm(config, serial_sink=console)
    vmm.submit(a.StartInstance())

    def client() -> None:
        wait_until(lambda: len(console.ticks()) >= 2)
        vmm.submit(a.UpdateBlockDevice("data", path=second, rate_limiter=limit))
        vmm.submit(a.Pause())
        vmm.submit(a.CreateSnapshot(tmp_path / "state", tmp_path / "memory"))

    run_with_client(vmm, client, "snapshot taken")
    described = read_description(read_state_file(tmp_path / "state"))
    assert [(d.path, d.rate_limiter) for d in described.disks] == [(str(second), limit)]
