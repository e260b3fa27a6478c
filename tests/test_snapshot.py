"""Snapshots on this machine's KVM: pause, snapshot, restore in a new process, and bad files refused."""

from __future__ import annotations

import hashlib
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kvmpy.state.errors import StateError
from kvmpy.state.snapshot_file import MAGIC, Section, parse_state, read_state_file, write_state_file
from kvmpy.testing.console import CapturedConsole, ticks, wait_until
from kvmpy.testing.process import kvmpy, read_until, start_kvmpy
from kvmpy.testing.vmm_client import run_with_client
from kvmpy.vmm import actions as a
from kvmpy.vmm.actions import ActionError
from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
from kvmpy.vmm.vmm import Vmm


def _snapshot_counter(guests: Path, directory: Path, cpus: int = 2) -> str:
    """Run the counter guest, pause it after a few ticks, snapshot it into ``directory``;
    returns what it printed up to the snapshot."""
    console = CapturedConsole()
    config = VmConfig(kernel=guests / "counter.elf", cmdline="gap=20000000", cpus=cpus,
                      serial=SerialConfig(SerialMode.NONE))
    vmm = Vmm(config, serial_sink=console)
    vmm.submit(a.StartInstance())

    def client() -> None:
        wait_until(lambda: len(ticks(console.text)) >= 5)
        with pytest.raises(ActionError, match="paused"):
            vmm.submit(a.CreateSnapshot(directory / "state", directory / "memory"))
        vmm.submit(a.Pause())
        vmm.submit(a.CreateSnapshot(directory / "state", directory / "memory"))

    run_with_client(vmm, client, "snapshot taken")
    return console.text


@pytest.fixture(scope="module")
def snapshot(guests: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    directory = tmp_path_factory.mktemp("snapshot")
    return directory, _snapshot_counter(guests, directory)


def test_restore_in_a_new_process_continues_the_count(snapshot: tuple[Path, str]) -> None:
    directory, before = snapshot
    process = start_kvmpy("run", "--restore", str(directory))
    after = read_until(process, lambda text: len(ticks(text)) >= 3)
    process.terminate()
    _, stderr = process.communicate(timeout=20)
    seen = ticks(before + after)  # a line cut by the pause is finished after the restore
    assert len(ticks(after)) >= 3, stderr
    assert seen == list(range(1, len(seen) + 1)), f"{seen}\n{stderr}"
    assert "Traceback" not in stderr


def test_the_memory_file_is_guest_ram_and_never_changes_on_restore(snapshot: tuple[Path, str]) -> None:
    directory, _ = snapshot
    memory = directory / "memory"
    assert memory.stat().st_size == 256 << 20
    banner = b"kvmpy counter guest: the banner a monitor can find"
    assert banner in memory.read_bytes()[: 2 << 20]  # the guest's image, where the guest has it
    digest = hashlib.sha256(memory.read_bytes()).hexdigest()
    process = start_kvmpy("run", "--restore", str(directory))
    assert process.stdout is not None
    process.stdout.readline()
    process.terminate()
    process.communicate(timeout=20)
    assert hashlib.sha256(memory.read_bytes()).hexdigest() == digest  # MAP_PRIVATE: writes stay in RAM


def _rewrite(directory: Path, target: Path, change: Callable[[bytes], bytes]) -> Path:
    target.mkdir()
    (target / "memory").symlink_to(directory / "memory")
    (target / "state").write_bytes(change((directory / "state").read_bytes()))
    return target


def _with_checksum(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("flipped", lambda d: d[:100] + bytes([d[100] ^ 1]) + d[101:], "corrupted (checksum mismatch)"),
        ("truncated", lambda d: d[: len(d) // 2], "truncated"),
        ("empty", lambda d: b"", "truncated"),
        ("not-ours", lambda d: b"ELF" + d[3:], "not a kvmpy snapshot"),
        ("version", lambda d: _with_checksum(d[:16] + struct.pack("<I", 99) + d[20:-32]), "version 99"),
    ],
)
def test_a_bad_state_file_is_one_line_and_exit_2(
    snapshot: tuple[Path, str], tmp_path: Path, name: str, change: Callable[[bytes], bytes], message: str
) -> None:
    bad = _rewrite(snapshot[0], tmp_path / name, change)
    done = kvmpy("run", "--restore", str(bad), timeout=30)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_a_memory_file_too_small_is_refused(snapshot: tuple[Path, str], tmp_path: Path) -> None:
    bad = tmp_path / "small"
    bad.mkdir()
    (bad / "state").write_bytes((snapshot[0] / "state").read_bytes())
    (bad / "memory").write_bytes(b"\0" * 4096)
    done = kvmpy("run", "--restore", str(bad), timeout=30)
    assert done.returncode == 2 and "memory file" in done.stderr and "needs" in done.stderr, done.stderr


def test_sections_are_checked_by_type(snapshot: tuple[Path, str], tmp_path: Path) -> None:
    sections = read_state_file(snapshot[0] / "state")
    assert {"machine", "vm", "vcpus", "device:serial", "device:i8042", "device:rtc"} <= set(sections)
    forged = dict(sections, machine=Section(1, b"\x93\x01\x02\x03"))  # an array where a map belongs
    write_state_file(tmp_path / "state", forged)
    (tmp_path / "memory").symlink_to(snapshot[0] / "memory")
    done = kvmpy("run", "--restore", str(tmp_path), timeout=30)
    assert done.returncode == 2 and "section machine" in done.stderr, done.stderr


def test_parse_refuses_garbage_without_a_traceback() -> None:
    for data in (b"", MAGIC, MAGIC + b"\0" * 100, b"\xff" * 4096):
        with pytest.raises(StateError):
            parse_state(data)


def test_snapshot_needs_a_paused_vm_and_a_fresh_vmm_for_load(guests: Path, tmp_path: Path) -> None:
    vmm = Vmm(VmConfig(kernel=guests / "counter.elf"))
    with pytest.raises(ActionError, match="not supported before starting"):
        vmm.submit(a.CreateSnapshot(tmp_path / "s", tmp_path / "m"))
    with pytest.raises(ActionError, match="after configuring boot-specific resources"):
        vmm.submit(a.LoadSnapshot(tmp_path / "s", tmp_path / "m"))


def test_kvmpy_snapshot_inspect(snapshot: tuple[Path, str]) -> None:
    done = kvmpy("snapshot", "inspect", str(snapshot[0] / "state"))
    assert done.returncode == 0, done.stderr
    assert "vcpus" in done.stdout and "machine" in done.stdout and "2 vCPUs" in done.stdout


def test_restore_continues_where_the_guest_left_off_after_its_own_exit(guests: Path, tmp_path: Path) -> None:
    """A guest that ends after ticks=N ends after the restore too, with its status."""
    console = CapturedConsole()
    config = VmConfig(kernel=guests / "counter.elf", cmdline="ticks=60 gap=20000000",
                      serial=SerialConfig(SerialMode.NONE))
    vmm = Vmm(config, serial_sink=console)
    vmm.submit(a.StartInstance())

    def client() -> None:
        wait_until(lambda: len(ticks(console.text)) >= 3)
        vmm.submit(a.Pause())
        vmm.submit(a.CreateSnapshot(tmp_path / "state", tmp_path / "memory"))
        vmm.submit(a.Stop())

    thread = threading.Thread(target=client)
    thread.start()
    vmm.run()
    thread.join(10)
    done = kvmpy("run", "--restore", str(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    assert ticks(console.text + done.stdout)[-1] == 60


def test_a_diff_snapshot_holds_the_pages_written_since_the_last_and_merges_onto_it(
    guests: Path, tmp_path: Path
) -> None:
    console = CapturedConsole()
    config = VmConfig(kernel=guests / "counter.elf", cmdline="gap=20000000", track_dirty_pages=True,
                      serial=SerialConfig(SerialMode.NONE))
    vmm = Vmm(config, serial_sink=console)
    vmm.submit(a.StartInstance())
    full, diff, merged = tmp_path / "full", tmp_path / "diff", tmp_path / "merged"
    for directory in (full, diff, merged):
        directory.mkdir()
    marks: list[int] = []

    def client() -> None:
        try:
            wait_until(lambda: len(ticks(console.text)) >= 3)
            vmm.submit(a.Pause())
            vmm.submit(a.CreateSnapshot(full / "state", full / "memory", "Full"))
            vmm.submit(a.Resume())
            marks.append(len(ticks(console.text)))
            wait_until(lambda: len(ticks(console.text)) >= marks[0] + 3)
            vmm.submit(a.Pause())
            vmm.submit(a.CreateSnapshot(diff / "state", diff / "memory", "Diff"))
        finally:
            vmm.submit(a.Stop())

    thread = threading.Thread(target=client)
    thread.start()
    vmm.run()
    thread.join(10)
    before = console.text
    stored = (diff / "memory").stat().st_blocks * 512
    print(f"diff memory file: {stored} bytes on disk of {(diff / 'memory').stat().st_size}")
    assert 0 < stored <= 64 * 4096  # the stack, the guest's page-table A/D bits: a few pages
    (merged / "memory").write_bytes((full / "memory").read_bytes())
    (merged / "state").write_bytes((diff / "state").read_bytes())
    done = kvmpy("snapshot", "merge", str(diff / "memory"), str(merged / "memory"))
    assert done.returncode == 0, done.stderr
    process = start_kvmpy("run", "--restore", str(merged))
    after = read_until(process, lambda text: len(ticks(text)) >= 3)
    process.terminate()
    _, stderr = process.communicate(timeout=20)
    seen = ticks(before + after)
    assert len(ticks(after)) >= 3 and seen == list(range(1, len(seen) + 1)), f"{seen}\n{stderr}"


def test_a_diff_snapshot_needs_dirty_tracking(guests: Path, tmp_path: Path) -> None:
    vmm = Vmm(VmConfig(kernel=guests / "counter.elf", cmdline="gap=20000000",
                       serial=SerialConfig(SerialMode.NONE)), serial_sink=CapturedConsole())
    vmm.submit(a.StartInstance())

    def client() -> None:
        try:
            vmm.submit(a.Pause())
            with pytest.raises(ActionError, match="track_dirty_pages"):
                vmm.submit(a.CreateSnapshot(tmp_path / "state", tmp_path / "memory", "Diff"))
        finally:
            vmm.submit(a.Stop())

    thread = threading.Thread(target=client)
    thread.start()
    vmm.run()
    thread.join(10)


def test_clock_realtime_moves_kvmclock_on_by_the_time_spent_in_the_snapshot(
    snapshot: tuple[Path, str],
) -> None:
    """Firecracker's clock_realtime: the guest's kvmclock, read right after the load, is later by
    about the time since the snapshot was taken; without it, kvmclock goes on from where it was."""
    import os

    directory = snapshot[0]
    taken = os.stat(directory / "state").st_mtime
    clocks = {}
    for realtime in (False, True):
        vmm = Vmm(VmConfig(serial=SerialConfig(SerialMode.NONE)), serial_sink=CapturedConsole())
        vmm.submit(a.LoadSnapshot(directory / "state", directory / "memory", clock_realtime=realtime))
        assert vmm.machine is not None
        clocks[realtime] = vmm.machine.vm.get_clock().clock
        vmm.submit(a.Stop())
        vmm.run()
    elapsed_ns = (time.time() - taken) * 1e9
    assert clocks[True] - clocks[False] > 0.5 * elapsed_ns


def test_an_armed_tsc_deadline_timer_survives_a_restore(guests: Path) -> None:
    """KVM ignores IA32_TSC_DEADLINE until the local APIC's timer is in TSC-deadline mode: a
    restore that loaded it with the other MSRs, before the APIC, lost an armed timer (a
    restored Linux idled for ever in the lab). Fails before the fix: the deadline reads 0."""
    import dataclasses

    from kvmpy.state.kvm_state import MSR_IA32_TSC_DEADLINE, restore_vcpu, save_vcpu
    from kvmpy.vmm.machine import Machine

    config = VmConfig(kernel=guests / "hello.elf", serial=SerialConfig(SerialMode.NONE))
    source, target = Machine(config), Machine(config)
    try:
        indices = source.system.msr_index_list()
        if MSR_IA32_TSC_DEADLINE not in indices:
            pytest.skip("this host's KVM does not save the TSC deadline MSR")
        state = save_vcpu(source.vcpus[0], indices)
        lapic = bytearray(state.lapic)
        lvtt = 0x320
        timer = int.from_bytes(lapic[lvtt : lvtt + 4], "little") & ~(0x3 << 17 | 1 << 16)
        lapic[lvtt : lvtt + 4] = (timer | 0x2 << 17 | 0xEC).to_bytes(4, "little")  # TSC-deadline mode
        deadline = source.vcpus[0].get_msrs([0x10])[0x10] + (1 << 40)  # far ahead of the TSC
        msrs = tuple((i, deadline if i == MSR_IA32_TSC_DEADLINE else v) for i, v in state.msrs)
        if MSR_IA32_TSC_DEADLINE not in dict(msrs):
            msrs += ((MSR_IA32_TSC_DEADLINE, deadline),)
        armed = dataclasses.replace(state, lapic=bytes(lapic), msrs=msrs)
        restore_vcpu(target.vcpus[0], armed, indices)
        assert target.vcpus[0].get_msrs([MSR_IA32_TSC_DEADLINE])[MSR_IA32_TSC_DEADLINE] == deadline
    finally:
        source.close()
        target.close()
