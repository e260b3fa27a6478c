"""The floors of an exit round trip: a bare KVM_RUN loop in Python and in C, on a guest kvmpy set up.

``run_loop`` (and ``python -m kvmpy.bench.floor_loop python|c GUEST CMDLINE
[--library SO]``, which prints its result as one JSON line) builds and boots
the guest with kvmpy's Machine (the same memory, CPUID, devices and boot state
as under ``kvmpy run``), then runs vCPU 0 in one of two
loops that do nothing but call KVM_RUN and look at the exit reason: port reads
answer 0 (LSR "transmitter empty"), the debug-exit port ends the loop. The
result: the guest's status, the loop's wall and CPU seconds (the looping
thread's, guest time included) and its exits.

These are what a Python VMM and any VMM can reach on this host; kvmpy's
overhead per exit is its figure minus the Python floor. Nothing here is on
kvmpy's run path.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import mmap
import struct
import sys
import time
from pathlib import Path

from kvmpy.abi import kvm as abi

DEBUG_EXIT_PORT = 0x501
COM1_LSR = 0x3FD
LSR_TRANSMITTER_EMPTY = 0x60
_REASON = struct.Struct(f"<{abi.kvm_run.exit_reason.offset}xI")
_IO = struct.Struct(f"<{abi.kvm_run.io.offset}xBBHIQ")  # direction, size, port, count, data_offset
_MMIO_DATA = abi.kvm_run.mmio.offset + 8


#: (guest status, wall seconds, CPU seconds of the looping thread, exits)
LoopResult = tuple[int, float, float, int]


def python_loop(fd: int, page: mmap.mmap) -> LoopResult:
    """KVM_RUN through fcntl.ioctl, the reason read with struct."""
    ioctl, run = fcntl.ioctl, abi.KVM_RUN
    reason_of, io_of = _REASON.unpack_from, _IO.unpack_from
    exit_io, exit_mmio = abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO
    exits = 0
    began, began_cpu = time.perf_counter(), time.thread_time()
    while True:
        try:
            ioctl(fd, run, 0)
        except (InterruptedError, BlockingIOError):
            continue
        exits += 1
        reason = reason_of(page)[0]
        if reason == exit_io:
            direction, size, port, count, offset = io_of(page)
            if direction == abi.KVM_EXIT_IO_OUT:
                if port == DEBUG_EXIT_PORT:
                    status = page[offset]
                    break
            else:
                page[offset : offset + size * count] = bytes(size * count)
                if port == COM1_LSR:
                    page[offset] = LSR_TRANSMITTER_EMPTY
        elif reason == exit_mmio:
            page[_MMIO_DATA : _MMIO_DATA + 8] = bytes(8)
        else:
            status = -1000 - reason
            break
    cpu = time.thread_time() - began_cpu
    return status, time.perf_counter() - began, cpu, exits


def c_loop(library: Path, fd: int, page: mmap.mmap) -> LoopResult:
    """floor_loop.c's kvmpy_floor_loop (ctypes drops the GIL while it runs)."""
    loop = ctypes.CDLL(str(library)).kvmpy_floor_loop
    double = ctypes.POINTER(ctypes.c_double)
    loop.argtypes = [ctypes.c_int, ctypes.c_void_p, double, double, ctypes.POINTER(ctypes.c_long)]
    loop.restype = ctypes.c_int
    run_page = ctypes.c_char.from_buffer(page)
    seconds, cpu, exits = ctypes.c_double(), ctypes.c_double(), ctypes.c_long()
    status = loop(
        fd, ctypes.addressof(run_page), ctypes.byref(seconds), ctypes.byref(cpu), ctypes.byref(exits)
    )
    del run_page  # release the export before the mapping closes
    return status, seconds.value, cpu.value, exits.value


def run_loop(
    loop: str, guest: Path, cmdline: str, memory_mib: int = 256, library: Path | None = None
) -> LoopResult:
    """Build and boot ``guest`` with kvmpy's Machine, then run vCPU 0 in ``loop`` ("python" or "c")."""
    from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
    from kvmpy.vmm.machine import Machine

    if loop == "c" and library is None:
        raise ValueError("the C loop needs the compiled floor_loop.c")
    config = VmConfig(
        kernel=guest, cmdline=cmdline, memory=memory_mib << 20, serial=SerialConfig(SerialMode.NONE)
    )
    machine = Machine(config)
    try:
        machine.boot_kernel()
        vcpu = machine.vcpus[0]
        page = mmap.mmap(vcpu.fd, machine.system.vcpu_mmap_size(), mmap.MAP_SHARED)
        try:
            if loop == "python":
                return python_loop(vcpu.fd, page)
            assert library is not None
            return c_loop(library, vcpu.fd, page)
        finally:
            page.close()
    finally:
        machine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmpy.bench.floor_loop")
    parser.add_argument("loop", choices=("python", "c"))
    parser.add_argument("guest", type=Path)
    parser.add_argument("cmdline")
    parser.add_argument("--library", type=Path, help="floor_loop.c compiled as a shared object")
    parser.add_argument("--memory-mib", type=int, default=256)
    args = parser.parse_args(argv)
    if args.loop == "c" and args.library is None:
        parser.error("the C loop needs --library")
    status, seconds, cpu, exits = run_loop(args.loop, args.guest, args.cmdline, args.memory_mib, args.library)
    print(json.dumps({"status": status, "seconds": seconds, "cpu_seconds": cpu, "exits": exits}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
