"""A lab scenario that overcommits a guest with its balloon, through the API alone.

The VMM starts with nothing but ``--api-sock``; this driver configures the VM
and a balloon with no target (Firecracker's ``PUT /balloon``), starts it, and
follows the guest (see ``BALLOON_API_COMMAND`` in the tests): the guest fills
most of its RAM and frees it again, so the VMM holds those pages; the driver
then sets the target to half the guest's RAM (``PATCH /balloon``), Linux's
virtio_balloon hands that many pages over, and kvmpy discards them, so the
VMM's resident memory falls by about as much; the target back at zero, the
guest gets its pages back and fills them again. The VMM's resident memory at
each step, the times and the API's answers are the facts; assertions stay
with the test.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kvmpy.lab.api_driver import ApiDriver

#: How long each step of the guest (a fill of hundreds of MiB, the balloon moving that much)
#: may take under TCG.
STEP_SECONDS = 600.0


def resident_kib(pid: int) -> int:
    """VmRSS of process ``pid``, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


class BalloonDriver(ApiDriver):
    """Inflate to half the guest's RAM and back, recording what the host's memory does."""

    def drive(self, kernel: str, initrd: str | None, boot_args: str, cpus: int, memory_mib: int) -> None:
        facts = self.facts
        balloon: dict[str, Any] = {"amount_mib": 0, "deflate_on_oom": False, "stats_polling_interval_s": 1}
        self.boot(kernel, initrd, boot_args, cpus, memory_mib, devices=(("/balloon", balloon),))
        pid = self.vmm_pid()
        facts["target_mib"] = target = memory_mib // 2
        self._step("BALLOON-FILLED", "filled", pid)
        started = time.monotonic()
        facts["inflate"] = self.call("PATCH", "/balloon", {"amount_mib": target})[0]
        self._step("BALLOON-INFLATED", "inflated", pid)
        facts["inflate_seconds"] = round(time.monotonic() - started, 2)
        facts["statistics"] = self.call("GET", "/balloon/statistics")[1]
        facts["balloon"] = self.call("GET", "/balloon")[1]
        started = time.monotonic()
        facts["deflate"] = self.call("PATCH", "/balloon", {"amount_mib": 0})[0]
        self._step("BALLOON-DEFLATED", "deflated", pid)
        facts["deflate_seconds"] = round(time.monotonic() - started, 2)
        self._step("BALLOON-REFILLED", "refilled", pid)

    def _step(self, marker: str, name: str, pid: int) -> None:
        """Wait for the guest's ``marker`` line, then record the VMM's resident memory."""
        self.wait_for(marker, timeout=STEP_SECONDS)
        self.facts[f"rss_{name}_kib"] = kib = resident_kib(pid)
        self.step(f"{name}: the VMM holds {kib >> 10} MiB")


__all__ = ["BalloonDriver", "resident_kib"]
