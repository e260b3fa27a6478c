"""Run a VM from a config to its end: the command line's way of driving a :class:`Vmm`."""

from __future__ import annotations

import contextlib
import sys

from kvmpy.vmm.actions import StartInstance
from kvmpy.vmm.config import SerialMode, VmConfig
from kvmpy.vmm.console import ConsoleSink, terminal_input_mode
from kvmpy.vmm.vmm import RunResult, Vmm


def run_vm(
    config: VmConfig, *, serial_sink: ConsoleSink | None = None, stdin_fd: int | None = None
) -> RunResult:
    """Boot ``config`` and run it until it powers off, exits or fails.

    A reset restarts the VM from scratch (new KVM VM, fresh RAM) unless
    ``config.on_reboot`` says to exit. ``stdin_fd`` feeds the serial console
    (default: standard input when the console is on stdio).
    """
    if stdin_fd is None and config.serial.mode is SerialMode.STDIO and serial_sink is None:
        stdin_fd = stdin_fileno()
    vmm = Vmm(config, serial_sink=serial_sink, stdin_fd=stdin_fd)
    with terminal_mode(stdin_fd):
        vmm.submit(StartInstance())
        return vmm.run()


def terminal_mode(stdin_fd: int | None) -> contextlib.AbstractContextManager[None]:
    """Character-at-a-time terminal input while the VM runs, if input comes from a terminal."""
    return terminal_input_mode(stdin_fd) if stdin_fd is not None else contextlib.nullcontext()


def stdin_fileno() -> int | None:
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return None
    return fd


__all__ = ["RunResult", "run_vm", "stdin_fileno", "terminal_mode"]
