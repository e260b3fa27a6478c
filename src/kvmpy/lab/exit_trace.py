"""Count every return from KVM_RUN to userspace, by exit reason, whichever VMM made them.

The lab's kernel fires the ``kvm:kvm_userspace_exit`` tracepoint each time a vCPU's KVM_RUN
returns to its VMM; a histogram trigger on it (``hist:keys=reason``) keeps one counter per exit
reason inside the kernel, with no trace buffer to overflow. The same count for kvmpy and QEMU,
from outside both, so the boot benchmark can put their exits side by side. The lab runs one VM
at a time, so the kernel-wide histogram is that VM's.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from kvmpy.abi import kvm_generated as abi

TRACEFS = Path("/sys/kernel/tracing")
EVENT = TRACEFS / "events" / "kvm" / "kvm_userspace_exit"
TRIGGER = "hist:keys=reason:size=256"
#: Constants named KVM_EXIT_* that are not exit reasons (an I/O exit's direction, the subtypes
#: of the Hyper-V and Xen exits): their numbers would shadow real reasons.
_NOT_REASONS = {"IO_IN", "IO_OUT", "HYPERV_HCALL", "HYPERV_SYNDBG", "HYPERV_SYNIC", "XEN_HCALL"}
#: KVM's exit reasons by number (KVM_EXIT_IO is 2, and so on), for the report.
REASON_NAMES = {
    value: name.removeprefix("KVM_EXIT_").lower()
    for name, value in vars(abi).items()
    if name.startswith("KVM_EXIT_") and isinstance(value, int) and name[9:] not in _NOT_REASONS
}
_ENTRY = re.compile(r"\{\s*reason:\s*(\d+)\s*\}\s*hitcount:\s*(\d+)")


class ExitTraceError(Exception):
    """The kernel cannot count exits here (no tracefs, no kvm events, not root)."""


def parse_histogram(text: str) -> dict[str, int]:
    """The kernel's ``hist`` file, as {exit reason name: returns to userspace}."""
    counts: dict[str, int] = {}
    for match in _ENTRY.finditer(text):
        reason, hits = int(match.group(1)), int(match.group(2))
        name = REASON_NAMES.get(reason, f"reason_{reason}")
        counts[name] = counts.get(name, 0) + hits
    return counts


class ExitCounter:
    """Arm with :meth:`start` before a VM runs, read with :meth:`stop` after it ended."""

    def __init__(self, event: Path = EVENT) -> None:
        self._event = event

    def start(self) -> None:
        """A fresh histogram: an old trigger (a run that died) is removed first."""
        _mount_tracefs(self._event)
        trigger = self._event / "trigger"
        if not trigger.exists():
            raise ExitTraceError(f"no {trigger}: is the kvm module loaded?")
        self._remove()
        _write(trigger, TRIGGER)

    def stop(self) -> dict[str, int]:
        """The counts since :meth:`start`; the trigger is removed (the kernel's counters with it)."""
        try:
            return parse_histogram((self._event / "hist").read_text())
        except OSError as error:
            raise ExitTraceError(f"cannot read {self._event / 'hist'}: {error.strerror}") from error
        finally:
            self._remove()

    def _remove(self) -> None:
        trigger = self._event / "trigger"
        if TRIGGER.split(":size")[0] in trigger.read_text():
            _write(trigger, "!" + TRIGGER)


def _mount_tracefs(event: Path) -> None:
    if event.exists() or event != EVENT or not TRACEFS.is_dir():
        return
    subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=False, capture_output=True)


def _write(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as error:
        raise ExitTraceError(f"cannot write {text!r} to {path}: {error.strerror}") from error


__all__ = ["ExitCounter", "ExitTraceError", "parse_histogram"]
