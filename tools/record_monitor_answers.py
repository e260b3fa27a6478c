"""Record the monitor's answers on a live counter guest, for the ``kvmpy ctl`` formatting tests.

    PYTHONPATH=src python tools/record_monitor_answers.py tests/data/monitor

Runs the counter guest (2 vCPUs, a virtio-rng on PCI) on this machine's KVM,
asks every monitor question once it is running, and writes each answer as
JSON: the tests format real answers, never hand-written ones (``status`` comes
from a VMM that has not started, so it says "Not started").
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
from pathlib import Path

from kvmpy.testing.guests import guest_path
from kvmpy.vmm import actions
from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
from kvmpy.vmm.inspect import answer
from kvmpy.vmm.machine import Machine
from kvmpy.vmm.stop import StopKind, StopReason
from kvmpy.vmm.vmm import Vmm


class Console:
    def __init__(self) -> None:
        self.data = bytearray()
        self.lock = threading.Lock()

    def write(self, data: bytes) -> int:
        with self.lock:
            self.data += data
        return len(data)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        with self.lock:
            return self.data.decode("ascii", "replace")


def instance_info() -> dict[str, str]:
    """GET / as Firecracker shapes it, from the VMM's InstanceInfo (a VMM not yet started)."""
    info = Vmm(vm_id="recorded").submit(actions.GetInstanceInfo())
    assert isinstance(info, actions.InstanceInfo)
    return {
        "id": info.id,
        "state": info.state.value,
        "vmm_version": info.vmm_version,
        "app_name": info.app_name,
    }


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    config = VmConfig(
        kernel=guest_path("counter"),
        cmdline="gap=20000000",
        cpus=2,
        rng=True,
        serial=SerialConfig(SerialMode.NONE),
    )
    machine = Machine(config, serial_sink=console)
    machine.boot_kernel()
    started = time.monotonic()
    machine.start()
    try:
        while "tick 3" not in console.text():
            time.sleep(0.02)
        match = re.search(r"banner at (0x[0-9a-f]+)", console.text())
        assert match is not None
        banner = int(match.group(1), 16)
        answers = {
            "status": instance_info(),
            "regs": answer(machine, actions.GetRegisters(0)),
            "translate": answer(machine, actions.TranslateAddress(banner)),
            "translate_unmapped": answer(machine, actions.TranslateAddress(0x7F00_0000_0000)),
            "translate_mmio": answer(machine, actions.TranslateAddress(0xE000_0000)),
            "memory": answer(machine, actions.ReadMemory((banner | 0xFFF) - 7, 40)),
            "memory_physical": answer(machine, actions.ReadMemory(banner, 51, physical=True)),
            "mtree": answer(machine, actions.GetMemoryTree()),
            "irq": answer(machine, actions.GetIrqState()),
            "vcpus": answer(machine, actions.GetVcpus()),
            "stats_before": answer(machine, actions.GetStats(), started_at=started),
        }
        time.sleep(1.0)
        answers["stats_after"] = answer(machine, actions.GetStats(), started_at=started)
    finally:
        machine.request_stop(StopReason(StopKind.STOPPED, 0, "recorded"))
        machine.finish()
        machine.close()
    for name, value in answers.items():
        (out / f"{name}.json").write_text(json.dumps(value, indent=1) + "\n")
    print(f"banner at {banner:#x}; {len(answers)} answers in {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/monitor"))
