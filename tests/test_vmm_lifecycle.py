"""The VMM's lifecycle: the transition table, and pause/resume of a live guest on this machine's KVM."""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmpy.errors import ConfigError
from kvmpy.testing.console import CapturedConsole
from kvmpy.testing.process import start_kvmpy
from kvmpy.testing.vmm_client import run_with_client
from kvmpy.vmm import actions as a
from kvmpy.vmm.actions import ActionError, VmState
from kvmpy.vmm.config import NetConfig, SerialConfig, SerialMode, VmConfig
from kvmpy.vmm.lifecycle import TRANSITIONS, Event, Lifecycle, LifecycleError
from kvmpy.vmm.stop import StopKind
from kvmpy.vmm.vmm import Vmm


# --- the table ----------------------------------------------------------------------------
def test_every_state_event_pair_is_decided_by_the_table() -> None:
    for state in VmState:
        for event in Event:
            lifecycle = Lifecycle()
            lifecycle.state = state
            if (state, event) in TRANSITIONS:
                assert lifecycle.apply(event) is TRANSITIONS[(state, event)]
            else:
                with pytest.raises(LifecycleError, match=f"cannot {event.value}"):
                    lifecycle.apply(event)
                assert lifecycle.state is state


def test_pause_and_resume_are_idempotent() -> None:
    lifecycle = Lifecycle()
    lifecycle.apply(Event.START)
    assert lifecycle.apply(Event.PAUSE) is VmState.PAUSED
    assert lifecycle.apply(Event.PAUSE) is VmState.PAUSED
    assert lifecycle.apply(Event.RESUME) is VmState.RUNNING
    assert lifecycle.apply(Event.RESUME) is VmState.RUNNING


def test_actions_in_the_wrong_phase_get_firecrackers_messages(tmp_path: Path) -> None:
    vmm = Vmm()
    with pytest.raises(ActionError, match=re.escape(a.NOT_ALLOWED_BEFORE_START)):
        vmm.submit(a.Pause())
    with pytest.raises(ActionError, match=re.escape(a.NOT_ALLOWED_BEFORE_START)):
        vmm.submit(a.SendCtrlAltDel())
    with pytest.raises(ConfigError, match="no kernel"):
        vmm.submit(a.StartInstance())
    with pytest.raises(ConfigError, match="does not exist"):
        vmm.submit(a.ConfigureBootSource(kernel=tmp_path / "missing"))
    info = vmm.submit(a.GetInstanceInfo())
    assert isinstance(info, a.InstanceInfo) and info.state is VmState.NOT_STARTED


# --- a live guest -----------------------------------------------------------------------------
def _counter_config(guests: Path, **options: object) -> VmConfig:
    settings: dict[str, object] = {"cmdline": "gap=20000000", "serial": SerialConfig(SerialMode.NONE)}
    return VmConfig(kernel=guests / "counter.elf", **{**settings, **options})  # type: ignore[arg-type]


@pytest.fixture
def running(guests: Path) -> Iterator[tuple[Vmm, CapturedConsole, list[object]]]:
    """A counter guest started through actions, the VMM loop on the main thread.

    The test body runs on a second thread (the API's place); the fixture's
    result list receives the RunResult when the VM stops.
    """
    console = CapturedConsole()
    vmm = Vmm(_counter_config(guests), serial_sink=console)
    vmm.submit(a.StartInstance())
    yield vmm, console, []


def _guest_ns(vmm: Vmm) -> int:
    assert vmm.machine is not None
    return sum(thread.stats.guest_ns for thread in vmm.machine.threads)


def test_pause_stops_the_guest_and_resume_continues_it(
    running: tuple[Vmm, CapturedConsole, list[object]],
) -> None:
    vmm, console, _ = running

    def body() -> None:
        console.wait_for_ticks(3)
        vmm.submit(a.Pause())
        vmm.submit(a.Pause())  # idempotent
        assert vmm.submit(a.GetInstanceInfo()).state is VmState.PAUSED  # type: ignore[attr-defined]
        frozen_ticks, frozen_ns = console.ticks(), _guest_ns(vmm)
        time.sleep(0.6)  # a dozen ticks' time
        assert console.ticks() == frozen_ticks, "the console went on while paused"
        assert _guest_ns(vmm) == frozen_ns, "vCPU time grew while paused"
        vmm.submit(a.Resume())
        vmm.submit(a.Resume())  # idempotent
        assert vmm.submit(a.GetInstanceInfo()).state is VmState.RUNNING  # type: ignore[attr-defined]
        seen = console.wait_for_ticks(len(frozen_ticks) + 3)
        assert seen == list(range(1, len(seen) + 1)), "ticks skipped or repeated across the pause"
        assert _guest_ns(vmm) > frozen_ns

    result = run_with_client(vmm, body)
    assert result.reason.kind is StopKind.STOPPED  # type: ignore[attr-defined]
    assert vmm.state is VmState.STOPPED


def test_vcpu_state_is_read_on_the_vcpu_thread_while_it_runs(
    running: tuple[Vmm, CapturedConsole, list[object]],
) -> None:
    vmm, console, _ = running

    def body() -> None:
        console.wait_for_ticks(1)
        machine = vmm.machine
        assert machine is not None
        callers: list[str] = []

        def read(vcpu: object) -> int:
            callers.append(threading.current_thread().name)
            return int(vcpu.get_regs().rip)  # type: ignore[attr-defined]

        started = time.monotonic()
        rips = [machine.on_vcpu(0, read) for _ in range(20)]
        assert time.monotonic() - started < 5
        assert callers == ["vcpu0"] * 20
        assert all(rip > 0 for rip in rips)
        vmm.submit(a.Pause())
        machine.on_vcpu(0, read)
        assert callers[-1] != "vcpu0"  # parked: read from here
        vmm.submit(a.Resume())

    run_with_client(vmm, body)


def test_stop_while_paused_ends_the_vm(running: tuple[Vmm, CapturedConsole, list[object]]) -> None:
    vmm, console, _ = running

    def body() -> None:
        console.wait_for_ticks(1)
        vmm.submit(a.Pause())

    result = run_with_client(vmm, body)
    assert result.reason.kind is StopKind.STOPPED  # type: ignore[attr-defined]
    assert vmm.submit(a.GetInstanceInfo()).state is VmState.STOPPED  # type: ignore[attr-defined]
    with pytest.raises(ActionError, match="stopped"):
        vmm.submit(a.Pause())


def test_guest_that_ends_stops_the_vmm(guests: Path) -> None:
    console = CapturedConsole()
    vmm = Vmm(VmConfig(kernel=guests / "counter.elf", cmdline="ticks=2 gap=1000",
                       serial=SerialConfig(SerialMode.NONE)), serial_sink=console)
    vmm.submit(a.StartInstance())
    result = vmm.run()
    assert result.reason.kind is StopKind.DEBUG_EXIT and result.reason.status == 0
    assert console.ticks() == [1, 2]
    assert vmm.state is VmState.STOPPED


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_failed_start_leaves_no_descriptors_and_a_fixed_config_starts(guests: Path) -> None:
    console = CapturedConsole()
    bad_tap = NetConfig(tap="x" * 20, id="eth0")
    vmm = Vmm(_counter_config(guests, cmdline="ticks=1 gap=1000", nets=(bad_tap,)), serial_sink=console)
    before = _open_fds()
    with pytest.raises(ConfigError, match="tap name"):
        vmm.submit(a.StartInstance())
    assert _open_fds() == before
    assert vmm.state is VmState.NOT_STARTED
    vmm.config = _counter_config(guests, cmdline="ticks=1 gap=1000")
    vmm.submit(a.StartInstance())
    assert vmm.run().reason.status == 0
    assert console.ticks() == [1]


def test_sigterm_stops_the_vm_cleanly(guests: Path) -> None:
    process = start_kvmpy("run", "--kernel", str(guests / "counter.elf"), "--cmdline", "gap=20000000")
    assert process.stdout is not None
    assert process.stdout.readline().startswith("banner at")
    process.terminate()
    _, stderr = process.communicate(timeout=20)
    assert process.returncode == 143, stderr
    assert "terminated (SIGTERM)" in stderr
    assert "Traceback" not in stderr


def test_flush_metrics_writes_the_registry_as_json_lines(guests: Path, tmp_path: Path) -> None:
    import json

    from kvmpy.vmm.config import MetricsConfig

    console = CapturedConsole()
    vmm = Vmm(_counter_config(guests), serial_sink=console)
    vmm.submit(a.ConfigureMetrics(MetricsConfig(tmp_path / "metrics.json")))
    vmm.submit(a.StartInstance())

    def body() -> None:
        console.wait_for_ticks(2)
        vmm.submit(a.FlushMetrics())
        console.wait_for_ticks(4)
        vmm.submit(a.FlushMetrics())

    run_with_client(vmm, body)
    lines = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert len(lines) >= 2  # two flushes, and one more as the machine was retired
    first, second = lines[0], lines[1]
    assert first["vmm"]["state"] == "Running"
    assert second["vcpus"]["exits"] > first["vcpus"]["exits"] > 0
    assert second["pio.serial-com1"]["writes"] > first["pio.serial-com1"]["writes"]
    assert {"serial", "console", "pci", "event-loop", "vcpu0"} <= set(first)


def test_a_running_drive_takes_another_backing_file(guests: Path, tmp_path: Path) -> None:
    from kvmpy.vmm.config import DiskConfig

    first, second = tmp_path / "first.img", tmp_path / "second.img"
    first.write_bytes(bytes(512 * 8))
    second.write_bytes(bytes(512 * 64))
    console = CapturedConsole()
    vmm = Vmm(_counter_config(guests, disks=(DiskConfig(first, id="scratch"),)), serial_sink=console)
    vmm.submit(a.StartInstance())

    def body() -> None:
        with pytest.raises(ActionError, match="Invalid block device ID"):
            vmm.submit(a.UpdateBlockDevice("nope", path=second))
        with pytest.raises(ActionError, match="does not exist"):
            vmm.submit(a.UpdateBlockDevice("scratch", path=tmp_path / "missing.img"))
        vmm.submit(a.UpdateBlockDevice("scratch", path=second))
        config = vmm.submit(a.GetVmConfig())
        assert config.disks[0].path == second  # type: ignore[attr-defined]
        assert vmm.machine is not None
        assert vmm.machine.disks["scratch"].device.capacity == 64  # type: ignore[attr-defined]

    run_with_client(vmm, body)


def test_a_running_drive_takes_new_rate_limits(guests: Path, tmp_path: Path) -> None:
    from kvmpy.vmm.config import DiskConfig, RateLimiterConfig, TokenBucketConfig

    image = tmp_path / "disk.img"
    image.write_bytes(bytes(512 * 8))
    vmm = Vmm(_counter_config(guests, disks=(DiskConfig(image, id="data"),)), serial_sink=CapturedConsole())
    vmm.submit(a.StartInstance())
    first = RateLimiterConfig(ops=TokenBucketConfig(size=100, refill_time_ms=1000))
    second = RateLimiterConfig(bandwidth=TokenBucketConfig(size=1 << 20, refill_time_ms=500))

    def body() -> None:
        assert vmm.machine is not None
        device = vmm.machine.disks["data"].device
        assert device.throttle is None  # type: ignore[attr-defined]
        vmm.submit(a.UpdateBlockDevice("data", rate_limiter=first))
        throttle = device.throttle  # type: ignore[attr-defined]
        assert throttle is not None and throttle.limiter.ops.size == 100
        assert throttle.limiter.bandwidth is None
        vmm.submit(a.UpdateBlockDevice("data", rate_limiter=second))
        assert device.throttle is throttle  # the same throttle, new buckets  # type: ignore[attr-defined]
        assert throttle.limiter.bandwidth.size == 1 << 20 and throttle.limiter.ops is None
        assert vmm.submit(a.GetVmConfig()).disks[0].rate_limiter == second  # type: ignore[attr-defined]

    run_with_client(vmm, body)


def test_a_device_that_closes_after_the_event_loop_stopped_forgets_its_descriptor() -> None:
    """The lab's jailed Debian panicked with virtio-net receiving: the machine's close then asked
    a stopped event loop to unregister the tap (ValueError), and the VMM's last stop touched the
    closed vCPUs (AttributeError), two tracebacks instead of the guest's panic report."""
    from kvmpy.vmm.event_loop import EventLoop

    loop = EventLoop()
    loop.start()
    read_end, write_end = os.pipe()
    try:
        loop.add(read_end, lambda: None)
        loop.stop()
        loop.remove(read_end)  # before: ValueError: I/O operation on closed epoll object
        loop.remove(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_closed_machine_can_be_stopped_again(guests: Path) -> None:
    from kvmpy.vmm.machine import Machine
    from kvmpy.vmm.stop import StopReason

    machine = Machine(VmConfig(kernel=guests / "hello.elf", serial=SerialConfig(SerialMode.NONE)))
    machine.boot_kernel()
    machine.start()
    assert machine.wait(30)
    assert machine.finish().kind is StopKind.DEBUG_EXIT
    machine.close()
    machine.request_stop(StopReason(StopKind.HOST_ERROR, 1, "the VMM stopped"))  # before: AttributeError
    machine.close()
