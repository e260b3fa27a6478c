"""Every bug the fuzz targets found, as a test that failed before its fix (docs/security.md).

Bugs in code another change owns (virtio, the buses, the RTC, the console) are pinned here
as strict xfails with their reproducer until that change fixes them; each is also a
KnownIssue of its fuzz target, so the campaign counts it instead of stopping on it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy.bus import Bus
from kvmpy.fuzz.harness import execute
from kvmpy.fuzz.registry import load
from kvmpy.fuzz.targets.virtio_devices import RecordingMsi
from kvmpy.memory.guest_memory import GuestMemory
from kvmpy.devices.pci.root import PciRoot
from kvmpy.virtio.devices.rng import VirtioRng
from kvmpy.virtio.pci_transport import VirtioPciTransport

CRASHES = Path(__file__).resolve().parents[1] / "fuzz" / "crashes"


def test_a_bar_straddling_the_end_of_ram_stays_unmapped() -> None:
    """pci-config: a BAR half over RAM was mapped, because only a BAR wholly inside RAM was refused."""
    mem = GuestMemory.anonymous([(0, 0xFF000)])  # low RAM ending off a 16 KiB boundary
    mmio = Bus("mmio")
    root = PciRoot(Bus("pio"), mmio, mem.is_ram)
    transport = VirtioPciTransport(VirtioRng(), mem, RecordingMsi(), 0xC000_0000, 0xC000_4000, lambda _a: None)
    root.add(transport, 1)
    transport.config.write(0x10, 4, 0xFC000)  # BAR 0 (16 KiB): 0xFC000-0xFFFFF, RAM ends at 0xFF000
    transport.config.write(0x04, 2, 0x2)  # memory decoding on
    assert mmio.find(0xFC000) is None and mmio.find(0xFF000) is None
    assert root.refused_bars == 1
    mem.close()


@pytest.mark.parametrize("path", sorted(CRASHES.glob("*/*")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_saved_crash_replays_clean(path: Path) -> None:
    """The inputs the campaign saved (fuzz/crashes/TARGET/) no longer crash their target."""
    execute(load(path.parent.name), path.read_bytes())
