"""The --stats report adds up per-vCPU counters and shows every device row."""

from __future__ import annotations

from kvmpy.bus import Bus
from kvmpy.vmm.exit_stats import VcpuExitStats, merge_reasons
from kvmpy.vmm.stats_report import collect, device_accesses, device_exits, format_stats


class Sink:
    def read(self, offset: int, data: memoryview) -> None:
        data[:] = b"\0" * len(data)

    def write(self, offset: int, data: bytes) -> None:
        pass


def test_merge_and_format() -> None:
    first, second = VcpuExitStats(0), VcpuExitStats(1)
    for _ in range(3):
        first.record("io", 1000, 2000)
    second.record("io", 1000, 4000)
    second.record("mmio", 1000, 1000)
    second.kernel = {"exits": 42, "halt_exits": 5}
    totals = merge_reasons([first, second])
    assert [(r.reason, r.count, r.handle_ns) for r in totals] == [("io", 4, 10000), ("mmio", 1, 1000)]

    pio = Bus("pio")
    pio.register(0x80, 1, Sink(), "post-code (0x80)")
    for _ in range(4):
        pio.write(0x80, b"\x01")
    pio.write(0x1234, b"\x01")
    stats = collect(1.5, [first, second], pio, Bus("mmio"))
    assert stats.total_exits == 5
    assert stats.device("post-code (0x80)").writes == 4
    text = format_stats(stats)
    row = next(line for line in text.splitlines() if line.startswith("post-code"))
    assert row.split()[3:5] == ["0", "4"]
    assert "0x1234" in text
    assert "halt_exits" in text


def test_device_accesses_are_read_back_from_the_printed_report() -> None:
    """Lab scenarios and benchmarks only see the printed table: reads and writes per device."""
    pio, mmio = Bus("pio"), Bus("mmio")
    pio.register(0x3F8, 8, Sink(), "serial (COM1)")
    mmio.register(0xC001_0000, 0x1000, Sink(), "virtio-console BAR0")
    mmio.register(0xC001_1000, 0x1000, Sink(), "virtio-console BAR1")
    for _ in range(5):
        pio.write(0x3FD, b"\x01")
    pio.read(0x3FD, memoryview(bytearray(1)))
    mmio.read(0xC001_0004, memoryview(bytearray(4)))
    mmio.write(0xC001_1000, b"\0\0")
    vcpu = VcpuExitStats(0)
    vcpu.buffered = {(True, 0x3FD): 4}  # four of the five writes waited in KVM's coalesced ring
    text = format_stats(collect(1.0, [vcpu], pio, mmio))
    assert "coalesced, at 0x3fd): 4" in text
    assert device_accesses(text, "serial (COM1)") == 6
    assert device_exits(text, "serial (COM1)") == 2
    assert device_exits(text, "virtio-console") == 2
    assert device_accesses(text, "virtio-console") == 2
    assert device_accesses(text, "virtio-net") == 0


def test_reasons_the_exit_path_made_ahead_but_never_took_are_left_out() -> None:
    vcpu = VcpuExitStats(0)
    vcpu.counter("io")  # the vCPU loop holds the counters of its common exits from the start
    vcpu.counter("mmio").count += 2
    assert [(r.reason, r.count) for r in merge_reasons([vcpu])] == [("mmio", 2)]
    assert vcpu.total_exits == 2
