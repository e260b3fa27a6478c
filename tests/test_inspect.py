"""The monitor on real vCPUs: a machine at its boot state, and the counter guest running live.

The live tests run the counter guest (ring 3 with its own 4-level page tables)
and ask the monitor about it while its vCPU thread is inside KVM_RUN: the
banner's guest-virtual address, printed by the guest, must translate to a
GPA whose bytes are the banner, in agreement with KVM_TRANSLATE.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmpy.memory.page_walk import PagingContext, PagingMode, walk
from kvmpy.testing.page_tables import PageTableBuilder
from kvmpy.vmm import actions
from kvmpy.vmm.actions import ActionError
from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
from kvmpy.vmm.inspect import MAX_READ, answer
from kvmpy.vmm.inspect.addresses import paging_features
from kvmpy.vmm.machine import Machine
from kvmpy.vmm.stop import StopKind, StopReason

pytestmark = pytest.mark.kvm

BANNER = b"kvmpy counter guest: the banner a monitor can find\0"


@pytest.fixture(scope="module")
def counter(guests: Path) -> Path:
    return guests / "counter.elf"


class Console:
    """A serial sink the test can wait on."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._lock = threading.Lock()

    def write(self, data: bytes) -> int:
        with self._lock:
            self._data += data
        return len(data)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        with self._lock:
            return self._data.decode("ascii", "replace")

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            if time.monotonic() > deadline:
                raise AssertionError(f"guest never printed {needle!r}; console: {self.text()!r}")
            time.sleep(0.02)
        return self.text()


def build(kernel: Path, console: Console | None = None, cmdline: str = "") -> Machine:
    config = VmConfig(kernel=kernel, cmdline=cmdline, serial=SerialConfig(SerialMode.NONE))
    machine = Machine(config, serial_sink=console)
    machine.boot_kernel()
    return machine


@pytest.fixture
def booted(counter: Path) -> Iterator[Machine]:
    machine = build(counter)
    yield machine
    machine.close()


class LiveCounter:
    """The counter guest running on its vCPU thread, and the banner address it printed."""

    def __init__(self, kernel: Path) -> None:
        self.console = Console()
        self.machine = build(kernel, self.console, cmdline="gap=20000000")
        self.started = time.monotonic()
        self.machine.start()  # from the main thread: it installs the kick signal's handler
        printed = self.console.wait_for("tick 2")
        match = re.search(r"banner at (0x[0-9a-f]+)", printed)
        assert match is not None, printed
        self.banner = int(match.group(1), 16)

    def stop(self) -> None:
        self.machine.request_stop(StopReason(StopKind.INTERRUPTED, 0, "test over"))
        self.machine.finish()
        self.machine.close()


@pytest.fixture(scope="module")
def live(counter: Path) -> Iterator[LiveCounter]:
    guest = LiveCounter(counter)
    yield guest
    guest.stop()


# --- a built machine, before its first instruction --------------------------------------
def test_registers_at_the_pvh_entry(booted: Machine) -> None:
    regs = answer(booted, actions.GetRegisters(0))
    assert regs["general"]["rip"] == booted.boot.entry
    assert regs["general"]["rbx"] == booted.boot.boot_info  # PVH: EBX = start info
    assert regs["cpu_mode"] == "32-bit protected mode"
    assert regs["paging_mode"] == "off" and regs["paging"] is False
    assert "PE" in regs["control"]["cr0"]["flags"] and "PG" not in regs["control"]["cr0"]["flags"]
    assert regs["cpl"] == 0
    cs = regs["segments"]["cs"]
    assert cs["present"] and cs["db"] and not cs["l"] and cs["type_name"].startswith("code execute")
    assert regs["rflags"]["value"] == 0x2 and regs["rflags"]["flags"] == []


def test_translate_with_paging_off_is_the_identity_and_agrees_with_kvm(booted: Machine) -> None:
    entry = booted.boot.entry
    result = answer(booted, actions.TranslateAddress(entry))
    assert result["mode"] == "off" and result["gpa"] == entry
    assert result["kvm"] == {"valid": True, "gpa": entry} and result["agrees_with_kvm"]
    slot = booted.vm.memory_slots[result["slot"]["slot"]]
    assert result["hva"] == slot.host_address + entry - slot.guest_phys_addr
    frame = result["host_frame"]
    assert frame["present"]  # the loader wrote the kernel there
    assert (frame["pfn"] is not None) == (frame["note"] is None)


def test_a_vcpu_that_does_not_exist_is_refused(booted: Machine) -> None:
    with pytest.raises(ActionError, match="there is no vCPU 3: this VM has vCPUs 0-0"):
        answer(booted, actions.GetRegisters(3))


def test_non_monitor_actions_are_refused(booted: Machine) -> None:
    with pytest.raises(ActionError, match="Pause is not a monitor request"):
        answer(booted, actions.Pause())


# --- the counter guest, live ------------------------------------------------------------
def test_the_banner_gva_translates_to_the_banner_bytes(live: LiveCounter) -> None:
    result = answer(live.machine, actions.TranslateAddress(live.banner))
    assert result["mode"] == "4-level"
    steps = result["walk"]["steps"]
    assert [s["table_name"] for s in steps] == ["PML4", "PDPT", "PD"]  # entry.S maps 2 MiB pages
    assert steps[-1]["maps"] == "2 MiB page" and "PS" in steps[-1]["flags"]
    gpa = result["gpa"]
    assert result["kvm"]["gpa"] == gpa and result["agrees_with_kvm"] is True
    assert live.machine.memory.read(gpa, len(BANNER)) == BANNER
    assert result["slot"]["slot"] == 0 and result["host_frame"]["present"]


def test_x_reads_the_banner_by_gva_and_by_gpa(live: LiveCounter) -> None:
    by_gva = answer(live.machine, actions.ReadMemory(live.banner, len(BANNER)))
    assert bytes.fromhex(by_gva["data"]) == BANNER
    gpa = by_gva["pages"][0]["gpa"]
    by_gpa = answer(live.machine, actions.ReadMemory(gpa, len(BANNER), physical=True))
    assert bytes.fromhex(by_gpa["data"]) == BANNER


def test_x_across_a_page_boundary_walks_each_page(live: LiveCounter) -> None:
    start = (live.banner | 0xFFF) - 7
    result = answer(live.machine, actions.ReadMemory(start, 16))
    assert [(p["gva"], p["length"]) for p in result["pages"]] == [(start, 8), (start + 8, 8)]
    assert bytes.fromhex(result["data"]) == live.machine.memory.read(result["pages"][0]["gpa"], 16)


def test_x_refusals_say_why(live: LiveCounter) -> None:
    with pytest.raises(ActionError, match=f"read 1 to {MAX_READ} bytes"):
        answer(live.machine, actions.ReadMemory(live.banner, MAX_READ + 1))
    with pytest.raises(ActionError, match="has no translation: not present at level 3"):
        answer(live.machine, actions.ReadMemory(0x1_0000_0000, 16))  # entry.S maps the first 4 GiB
    with pytest.raises(ActionError, match="is not guest RAM .*pci-ecam"):
        answer(live.machine, actions.ReadMemory(0xE000_0000, 4, physical=True))


def test_an_unmapped_gva_shows_where_the_walk_stopped(live: LiveCounter) -> None:
    result = answer(live.machine, actions.TranslateAddress(0x7F00_0000_0000))
    assert result["gpa"] is None and result["walk"]["fault"] == "not present at level 4 (PML4[254])"
    assert result["kvm"]["valid"] is False and result["agrees_with_kvm"] is True


def test_registers_of_the_running_guest(live: LiveCounter) -> None:
    regs = answer(live.machine, actions.GetRegisters(0))
    assert regs["paging_mode"] == "4-level" and regs["cpu_mode"] == "64-bit mode"
    assert {"PG", "PE", "WP"} <= set(regs["control"]["cr0"]["flags"])
    assert {"LME", "LMA"} <= set(regs["control"]["efer"]["flags"])
    assert regs["control"]["cr3"]["value"] == answer(live.machine, actions.TranslateAddress(0))["walk"]["cr3"]
    assert regs["cpl"] in (0, 3)  # ring 3 in main(), ring 0 in a port-I/O helper or interrupt


def test_vcpus_and_stats_grow_while_the_guest_runs(live: LiveCounter) -> None:
    first = answer(live.machine, actions.GetStats(), started_at=live.started)
    live.console.wait_for(f"tick {live.console.text().count('tick') + 2}")
    second = answer(live.machine, actions.GetStats(), started_at=live.started)
    assert second["total_exits"] > first["total_exits"] > 0
    assert second["sampled_at"] > first["sampled_at"] and second["wall_seconds"] > first["wall_seconds"]
    assert "serial (COM1)" in [row["name"] for row in second["pio"]]
    assert second["table"].startswith("kvmpy exit statistics")
    # KVM's own counters, read live: this host's KVM has KVM_GET_STATS_FD
    assert second["kernel"]["exits"] > first["kernel"]["exits"] > 0
    assert "in-kernel counters" in second["table"]
    vcpus = answer(live.machine, actions.GetVcpus(), vm_state="Running")["vcpus"]
    assert vcpus[0]["state"] == "running" and vcpus[0]["exits"] >= second["total_exits"]
    assert vcpus[0]["exits_by_reason"]["io"] > 0 and vcpus[0]["guest_seconds"] > 0


def test_memory_tree_lists_slots_buses_and_pci(live: LiveCounter) -> None:
    tree = answer(live.machine, actions.GetMemoryTree())
    assert [(s["slot"], s["gpa_start"]) for s in tree["slots"]][0] == (0, 0)
    assert sum(s["size"] for s in tree["slots"]) == live.machine.memory.total_size
    assert {"base": 0x3F8, "end": 0x400, "size": 8, "name": "serial (COM1)"} in tree["pio"]
    assert "pci-ecam" in [r["name"] for r in tree["mmio"]]
    assert tree["pci"][0]["name"] == "host-bridge"


def test_irq_state_has_the_ioapic_and_every_lapic(live: LiveCounter) -> None:
    irq = answer(live.machine, actions.GetIrqState())
    assert len(irq["ioapic"]["pins"]) == 24
    assert irq["ioapic"]["base_address"] == 0xFEC0_0000
    lapic = irq["lapics"][0]
    assert lapic["id"] == 0 and lapic["lint0"]["delivery_mode"] == "ExtINT"  # as the builder set it
    assert lapic["lint1"]["delivery_mode"] == "NMI"
    assert irq["msi_routes"] == []  # the counter guest has no PCI devices with MSI-X


def test_a_paused_guest_answers_and_stands_still(live: LiveCounter) -> None:
    live.machine.pause()
    try:
        before = answer(live.machine, actions.GetRegisters(0))
        vcpus = answer(live.machine, actions.GetVcpus())
        assert vcpus["vm_state"] == "Paused" and vcpus["vcpus"][0]["state"] == "paused"
        printed = live.console.text()
        time.sleep(0.3)  # the guest prints a tick about every 10 ms of TSC time when running
        assert live.console.text() == printed
        after = answer(live.machine, actions.GetRegisters(0))
        assert after["general"] == before["general"]
        result = answer(live.machine, actions.TranslateAddress(live.banner))
        assert live.machine.memory.read(result["gpa"], len(BANNER)) == BANNER
        assert result["agrees_with_kvm"] is True
    finally:
        live.machine.resume()
    live.console.wait_for(f"tick {live.console.text().count('tick') + 1}")


# --- kvmpy's walk against KVM's, on tables written into a real VM -------------------------
@pytest.fixture(scope="module")
def bare_vm(counter: Path) -> Iterator[Machine]:
    """A built machine whose vCPU never runs: its registers and RAM are the test's to set."""
    machine = build(counter)
    yield machine
    machine.close()


KVM_TABLES = 0x20_0000  # 2-6 MiB of the machine's RAM holds the test's tables


def _canonical(address: int) -> int:
    return address | ((1 << 64) - (1 << 48)) if address >> 47 else address


@settings(max_examples=25, deadline=None)
@given(
    mappings=st.lists(
        st.tuples(
            st.integers(0, (1 << 48) - 1),
            st.integers(0, (1 << 40) - 1),
            st.sampled_from([1 << 12, 1 << 21, 1 << 30]),
            st.sampled_from([0x1, 0x3, 0x5, 0x7, 0x3 | 1 << 63]),
        ),
        min_size=1,
        max_size=8,
    ),
    probes=st.lists(st.integers(0, (1 << 48) - 1), max_size=4),
)
def test_the_walk_agrees_with_kvm_translate(
    bare_vm: Machine, mappings: list[tuple[int, int, int, int]], probes: list[int]
) -> None:
    builder = PageTableBuilder(bare_vm.memory, PagingMode.LEVEL4, KVM_TABLES, 0x40_0000)
    placed: list[tuple[int, int]] = []
    for gva, gpa, size, flags in mappings:
        gva &= ~(size - 1)
        if any(gva < end and start < gva + size for start, end in placed):
            continue
        placed.append((gva, gva + size))
        builder.map(gva, gpa & ~(size - 1), size, flags)
    vcpu = bare_vm.vcpus[0]
    sregs = vcpu.get_sregs()
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = 0x8001_0011, builder.cr3, 0x20, 0xD00  # long mode, NXE
    sregs.cs.l, sregs.cs.db = 1, 0
    vcpu.set_sregs(sregs)
    features = paging_features(bare_vm)  # this host's KVM offers no 1 GiB pages: PS there is reserved
    context = PagingContext(
        PagingMode.LEVEL4,
        builder.cr3,
        nx_enabled=True,
        max_phys_bits=features.max_phys_bits,
        gib_pages=features.gib_pages,
    )
    inside = [
        start + offset for start, end in placed for offset in (0, (end - start) // 2 + 0x7B, end - start - 1)
    ]
    for address in map(_canonical, [*inside, *probes]):
        ours = walk(bare_vm.memory, address, context)
        kvm = vcpu.translate(address)
        assert (ours.gpa is not None) == bool(kvm.valid), (hex(address), ours.fault)
        if kvm.valid:
            assert ours.gpa == kvm.physical_address


def test_memory_tree_shows_dirty_logging_on_the_slots(counter: Path) -> None:
    config = VmConfig(kernel=counter, serial=SerialConfig(SerialMode.NONE), track_dirty_pages=True)
    machine = Machine(config)
    try:
        slots = answer(machine, actions.GetMemoryTree())["slots"]
        assert slots and all(slot["flags"] == ["dirty-logging"] for slot in slots)
    finally:
        machine.close()


def test_a_gva_that_lands_on_mmio_names_the_device(live: LiveCounter) -> None:
    result = answer(live.machine, actions.TranslateAddress(0xE000_0000))  # identity-mapped like all 4 GiB
    assert result["gpa"] == 0xE000_0000 and result["agrees_with_kvm"] is True
    assert (result["slot"], result["device"], result["hva"], result["host_frame"]) == (
        None,
        "pci-ecam",
        None,
        None,
    )
