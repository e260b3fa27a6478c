"""Every bug the fuzz targets found, as a test that failed before its fix (docs/security.md).

Bugs in code another change owned (virtio, the buses, the RTC, the console) were pinned here
as strict xfails, and as KnownIssues of their fuzz targets, until that change (the hostile-guest
fixes) fixed them; they are plain regression tests now.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from kvmpy.api.config_file import config_actions
from kvmpy.api.messages import Request
from kvmpy.api.router import Router
from kvmpy.bus import Bus
from kvmpy.devices.legacy.acpi_pm import AcpiPm, AcpiPmState
from kvmpy.devices.legacy.rtc import CmosRtc, CmosRtcState
from kvmpy.devices.pci.root import PciRoot
from kvmpy.errors import ConfigError
from kvmpy.fuzz.harness import execute
from kvmpy.fuzz.registry import load, release
from kvmpy.fuzz.targets.loaders import bzimage_file
from kvmpy.fuzz.targets.virtio_devices import FakeTap, RecordingMsi
from kvmpy.loader.bzimage import load_bzimage
from kvmpy.loader.cmdline import write_cmdline
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.testing.fake_vmm import FakeVmm
from kvmpy.testing.fakes import RecordingInterruptLine
from kvmpy.testing.virtio_driver import Buffer, MockDriver
from kvmpy.virtio import pci_transport as pt
from kvmpy.virtio.devices.console import VirtioConsole
from kvmpy.virtio.devices.net import VirtioNet
from kvmpy.virtio.devices.rng import VirtioRng
from kvmpy.virtio.pci_transport import VirtioPciTransport

CRASHES = Path(__file__).resolve().parents[1] / "fuzz" / "crashes"


def test_a_bar_straddling_the_end_of_ram_stays_unmapped() -> None:
    """pci-config: a BAR half over RAM was mapped, because only a BAR wholly inside RAM was refused."""
    mem = GuestMemory.anonymous([(0, 0xFF000)])  # low RAM ending off a 16 KiB boundary
    mmio = Bus("mmio")
    root = PciRoot(Bus("pio"), mmio, mem.is_ram)
    transport = VirtioPciTransport(
        VirtioRng(), mem, RecordingMsi(), 0xC000_0000, 0xC000_4000, lambda _a: None
    )
    root.add(transport, 1)
    transport.config.write(0x10, 4, 0xFC000)  # BAR 0 (16 KiB): 0xFC000-0xFFFFF, RAM ends at 0xFF000
    transport.config.write(0x04, 2, 0x2)  # memory decoding on
    assert mmio.find(0xFC000) is None and mmio.find(0xFF000) is None
    assert root.refused_bars == 1
    mem.close()


@pytest.mark.parametrize("path", sorted(CRASHES.glob("*/*")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_saved_crash_replays_clean(path: Path) -> None:
    """The inputs the campaign saved (fuzz/crashes/TARGET/) no longer crash their target."""
    target = load(path.parent.name)
    try:
        execute(target, path.read_bytes())
    finally:
        release(target)


# --- bugs the fuzz targets found in code the hostile-guest change owned, fixed there ------------
def _driver_ok(transport: VirtioPciTransport, mem: GuestMemory) -> list[MockDriver]:
    """A well-behaved driver's set-up through the common configuration, up to FEATURES_OK and the
    queues; returns their mock drivers (DRIVER_OK is left to the test)."""
    common = transport.bar_device(0)
    assert common is not None

    def write(offset: int, size: int, value: int) -> None:
        common.write(offset, value.to_bytes(size, "little"))

    write(20, 1, 3)
    for select in (0, 1):
        write(8, 4, select)
        write(12, 4, (transport.device.features >> (32 * select)) & 0xFFFF_FFFF)
    write(20, 1, 0x0B)
    drivers = []
    for index, queue in enumerate(transport.queues):
        driver = MockDriver(mem, queue, 0x10000 + 0x4000 * index, size=16)
        queue.ready = False
        write(22, 2, index)
        write(24, 2, 16)
        for offset, value in ((32, driver.desc), (40, driver.avail), (48, driver.used)):
            write(offset, 8, value)
        write(28, 2, 1)
        drivers.append(driver)
    return drivers


def test_console_broken_receive_ring_with_input_pending() -> None:
    """virtio-console: a broken receive ring raised QueueError out of activate() in the guest's
    DRIVER_OK write when host input was pending (issue 13)."""
    mem = GuestMemory.anonymous([(0, 0x20000)])
    console = VirtioConsole(lambda _data: None)
    transport = VirtioPciTransport(console, mem, RecordingMsi(), 0xC000_0000, 0xC000_4000, lambda _a: None)
    drivers = _driver_ok(transport, mem)
    console.enqueue_input(b"typed early")
    mem.write_u16(drivers[0].avail + 2, 100)  # the available index runs 100 entries ahead of 16
    common = transport.bar_device(0)
    assert common is not None
    common.write(20, bytes([0x0F]))  # DRIVER_OK: must not raise
    assert transport.status & pt.STATUS_NEEDS_RESET


def test_net_receive_ring_run_ahead_is_contained() -> None:
    """virtio-net: _receive ran on the event loop outside the transport's guard, so a receive ring
    whose available index ran ahead raised QueueError there (issue 13)."""
    mem = GuestMemory.anonymous([(0, 0x20000)])
    tap, watched = FakeTap(), {}
    net = VirtioNet(tap, bytes(6), watched.__setitem__, lambda fd: watched.pop(fd, None))  # type: ignore[arg-type]
    transport = VirtioPciTransport(net, mem, RecordingMsi(), 0xC000_0000, 0xC000_4000, lambda _a: None)
    drivers = _driver_ok(transport, mem)
    common = transport.bar_device(0)
    assert common is not None
    common.write(20, bytes([0x0F]))
    mem.write_u16(drivers[0].avail + 2, 100)
    tap.peer.send(b"\0" * 12 + b"a packet")
    try:
        watched[tap.fd]()  # what the event loop runs when the tap is readable: must not raise
        assert transport.status & pt.STATUS_NEEDS_RESET
    finally:
        net.close()


def test_rtc_survives_the_clock_set_to_the_end_of_9999() -> None:
    """CMOS RTC: a clock set to 9999-12-31 23:59:59 made every time register access raise
    ValueError one second later (issue 13)."""
    now = [1_780_000_000.0]
    rtc = CmosRtc(clock=lambda: now[0])
    for index, value in ((0x0B, 0x82), (0x32, 0x99), (0x09, 0x99), (0x08, 0x12), (0x07, 0x31),
                         (0x04, 0x23), (0x02, 0x59), (0x00, 0x59), (0x0B, 0x02)):  # fmt: skip
        rtc.write(0, bytes([index]))
        rtc.write(1, bytes([value]))
    now[0] += 1
    rtc.write(0, bytes([0x00]))
    data = bytearray(1)
    rtc.read(1, memoryview(data))  # must not raise


def test_a_command_line_of_any_bytes_reaches_the_kernel_as_typed() -> None:
    """loader-elf and loader-bzimage: a command line that is not UTF-8 (Python hands argv over with
    surrogate escapes) raised UnicodeEncodeError out of the loader, a traceback instead of a boot."""
    mem = GuestMemory.anonymous([(0, 1 << 20)])
    address = write_cmdline(mem, b"console=ttyS0 name=\xff\xfe".decode("utf-8", "surrogateescape"))
    assert mem.read(address, 22) == b"console=ttyS0 name=\xff\xfe\0"
    with pytest.raises(ConfigError, match="command line"):
        write_cmdline(mem, "lone \ud800 surrogate")  # no bytes stand behind it: one line, not a traceback
    mem.close()


def test_acpi_pm_restored_with_sci_asserted_lowers_it_when_cleared() -> None:
    """Found reading the restore paths for the snapshot target: AcpiPm.restore left its idea of the
    SCI level at False, so a guest clearing PM1_STS after a restore never lowered the line that
    KVM's restored IOAPIC still held high (and SLP_EN, which always reads 0, could be restored set)."""
    line = RecordingInterruptLine()
    line.set_level(True)  # the pin as KVM's restored irqchip has it
    pm = AcpiPm(lambda: None, lambda: None, line, clock=lambda: 0.0)
    pm.restore(AcpiPmState(status=1, enable=1, control=1 | 1 << 13))
    assert not pm.save().control & 1 << 13
    pm.write(0, b"\x01\x00")  # the guest's SCI handler clears the status bit
    assert line.level is False


@pytest.mark.parametrize("field", ["kernel_image_path", "initrd_path"])
def test_a_path_with_a_nul_byte_is_refused_by_the_api(field: str) -> None:
    """api: a JSON path with an escaped NUL (\\u0000) became a Path the VMM cannot open(): a
    ValueError, not an OSError, deep in the loader instead of a 400 naming the field."""
    vmm = FakeVmm()
    body = {"kernel_image_path": "/vmlinux", field: "/boot/vm\u0000linux"}
    response = Router(vmm.submit).handle(Request("PUT", "/boot-source", {}, json.dumps(body).encode()))
    assert response.status == 400 and field in json.loads(response.body)["fault_message"]
    assert not vmm.actions
    with pytest.raises(ConfigError, match=field):
        config_actions(json.dumps({"boot-source": body}).encode(), "vm.json")


@pytest.mark.parametrize("offset", [float("nan"), float("inf"), 1e20])
def test_rtc_restored_with_a_clock_offset_it_cannot_use(offset: float) -> None:
    """CMOS RTC, found writing the snapshot target: restore() took any float as the clock offset,
    and NaN, infinity or 10**20 seconds made the guest's first time read raise."""
    rtc = CmosRtc(clock=lambda: 1_780_000_000.0)
    try:
        rtc.restore(CmosRtcState(0, bytes(128), offset))
    except ValueError:
        return  # refused at restore, as untrusted state should be
    rtc.write(0, b"\x00")
    rtc.read(1, memoryview(bytearray(1)))  # must not raise


def test_a_bzimage_whose_setup_header_ends_before_its_fields_is_refused() -> None:
    """loader-bzimage, found by the campaign: the loader read initrd_addr_max, cmdline_size,
    pref_address and init_size from past the end the header gives itself (0x202 + the byte at
    0x201), so the zero page the kernel got (the header, up to that end) disagreed with where the
    initrd had been put. A 2.12+ header must reach init_size."""
    mem = GuestMemory.anonymous([(0, 8 << 20)])
    kernel = bytearray(bzimage_file())
    kernel[0x201] = 0x20  # the header "ends" at 0x222, before initrd_addr_max (0x22C)
    with pytest.raises(ConfigError, match="setup header"):
        load_bzimage(mem, Path("bzImage"), bytes(kernel), initrd=None, cmdline="", rsdp_address=0)
    mem.close()


# --- found by the campaign on fuzz-speed (2026-12-01, 22b2194) ----------------------------------
def test_rng_fills_its_buffer_when_getrandom_returns_short(monkeypatch: pytest.MonkeyPatch) -> None:
    """virtio-rng (found by the campaign after 83,339 inputs, the first with the device's code
    instrumented): getrandom(2) returns fewer bytes than asked for when a signal interrupts a
    request over 256 bytes (libFuzzer's timeout alarm did; in the VMM any signal can), and the
    device assigned the short result to the whole buffer: ValueError out of the notification."""
    real = os.getrandom
    monkeypatch.setattr(os, "getrandom", lambda size, flags=0: real(min(size, 256), flags))
    mem = GuestMemory.anonymous([(0, 0x20000)])
    transport = VirtioPciTransport(
        VirtioRng(), mem, RecordingMsi(), 0xC000_0000, 0xC000_4000, lambda _a: None
    )
    drivers = _driver_ok(transport, mem)
    common = transport.bar_device(0)
    assert common is not None
    common.write(20, bytes([0x0F]))
    drivers[0].add([Buffer(0x8000, 4096, writable=True)])
    transport.notify(0)  # must not raise
    assert drivers[0].used_entries() == [(0, 4096)]
    assert mem.read(0x8000 + 256, 4096 - 256) != bytes(4096 - 256)  # filled past the first short read
    assert not transport.status & pt.STATUS_NEEDS_RESET


def test_the_rng_crash_input_replays_clean_under_a_signal_storm() -> None:
    """The input the campaign saved for the short getrandom, with SIGALRM every 200 us (as
    libFuzzer's alarm, much more often): before the fix it crashed 300 times in 300."""
    target = load("virtio-rng")
    data = (CRASHES / "virtio-rng" / "getrandom-short-under-a-signal").read_bytes()
    previous = signal.signal(signal.SIGALRM, lambda _signum, _frame: None)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        for _ in range(50):
            execute(target, data)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release(target)
