"""Run a VM from a config to its end: build, run, reboot if asked, report."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvmpy.vmm.config import OnReboot, SerialMode, VmConfig, host_memory_bytes
from kvmpy.vmm.console import ConsoleSink, InputPump, terminal_input_mode
from kvmpy.vmm.machine import Machine
from kvmpy.vmm.stats_report import MachineStats, collect
from kvmpy.vmm.stop import StopKind, StopReason

if TYPE_CHECKING:
    from kvmpy.vmm.console_socket import ConsoleSocket

#: A guest that resets this many times in a row without doing anything else is stopped.
MAX_REBOOTS = 100


@dataclass(frozen=True, slots=True)
class RunResult:
    reason: StopReason
    stats: MachineStats
    boots: int
    console_tail: tuple[str, ...]


def run_vm(
    config: VmConfig, *, serial_sink: ConsoleSink | None = None, stdin_fd: int | None = None
) -> RunResult:
    """Boot ``config`` and run it until it powers off, exits or fails.

    A reset restarts the VM from scratch (new KVM VM, fresh RAM) unless
    ``config.on_reboot`` says to exit. ``stdin_fd`` feeds the serial console
    (default: standard input when the console is on stdio).
    """
    config.validate(host_memory_bytes())
    if stdin_fd is None and config.serial.mode is SerialMode.STDIO and serial_sink is None:
        stdin_fd = _stdin_fd()
    console_socket: ConsoleSocket | None = None
    if config.serial.mode is SerialMode.UNIX and serial_sink is None:
        assert config.serial.path is not None
        from kvmpy.vmm.console_socket import ConsoleSocket  # loaded only for a socket console

        console_socket = ConsoleSocket(config.serial.path)
    try:
        if console_socket is not None:
            serial_sink, stdin_fd = console_socket.accept()
        return _boot_until_done(config, serial_sink, stdin_fd)
    finally:
        if console_socket is not None:
            console_socket.close()


def _boot_until_done(config: VmConfig, serial_sink: ConsoleSink | None, stdin_fd: int | None) -> RunResult:
    boots = 0
    while True:
        boots += 1
        result = _boot_once(config, serial_sink, stdin_fd, boots)
        if result.reason.kind is not StopKind.RESET or config.on_reboot is OnReboot.EXIT:
            return result
        if boots > MAX_REBOOTS:
            return result


def _boot_once(
    config: VmConfig, serial_sink: ConsoleSink | None, stdin_fd: int | None, boots: int
) -> RunResult:
    machine = Machine(config, serial_sink=serial_sink)
    try:
        pump = InputPump(stdin_fd, machine.console_input) if stdin_fd is not None else None
        mode = terminal_input_mode(stdin_fd) if stdin_fd is not None else contextlib.nullcontext()
        started = time.monotonic()
        with mode:
            if pump is not None:
                pump.start()
            try:
                reason = machine.run()
            finally:
                if pump is not None:
                    pump.stop()
                    pump.join(1.0)
        stats = collect(
            time.monotonic() - started,
            [thread.stats for thread in machine.threads],
            machine.pio_bus,
            machine.mmio_bus,
        )
        return RunResult(reason, stats, boots, tuple(machine.console.last_lines()))
    finally:
        machine.close()


def _stdin_fd() -> int | None:
    try:
        fd = sys.stdin.fileno()
    except (AttributeError, ValueError, OSError):
        return None
    return fd


__all__ = ["RunResult", "run_vm"]
