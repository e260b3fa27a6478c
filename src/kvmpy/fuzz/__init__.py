"""Coverage-guided fuzzing of every parser of guest- and user-supplied data (issue 13).

Each target (:mod:`kvmpy.fuzz.targets`) is a plain ``bytes -> None`` function
over one parser, with the invariants it checks written next to it; the
harness (:mod:`kvmpy.fuzz.harness`) adds the ones every target shares (the
errors allowed to escape, time and memory per input, canaries around guest
RAM). Targets need no fuzzer to run, so a crash replays from its file with
plain Python (``python -m kvmpy.fuzz replay``) and in the regression tests.
The fuzzer itself is atheris (libFuzzer for Python), used only by the
engine (:mod:`kvmpy.fuzz.engine`) that the runner starts, one process per
target (:mod:`kvmpy.fuzz.runner`).

This module stays free of imports: the engine instruments kvmpy's modules
as they are imported, so nothing of kvmpy may be loaded before it starts.
"""

from __future__ import annotations

#: Target name -> the module under kvmpy.fuzz.targets that defines it (imported on demand).
TARGETS: dict[str, str] = {
    "virtqueue": "virtqueue",
    "virtio-blk": "virtio_devices",
    "virtio-net": "virtio_devices",
    "virtio-console": "virtio_devices",
    "virtio-rng": "virtio_devices",
    "virtio-pci": "virtio_pci",
    "pci-config": "pci_config",
    "uart16550": "legacy",
    "i8042": "legacy",
    "rtc": "legacy",
    "acpi-pm": "legacy",
    "pvpanic-debug-exit": "legacy",
    "loader-elf": "loaders",
    "loader-bzimage": "loaders",
    "api": "api",
    "snapshot": "snapshot",
}

__all__ = ["TARGETS"]
