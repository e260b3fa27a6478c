"""One thread per vCPU running the trap-and-emulate loop.

``KVM_RUN`` releases the GIL, so vCPUs run in parallel inside the guest;
only exits that need a device model come back to Python. The two taken by
the thousand, a single port-I/O access and an MMIO access, are handled in
the loop itself: their fields read with one ``unpack_from`` on the
``kvm_run`` page, the device found through the vCPU's own bus dispatcher
(the route of each address remembered), counted in plain integers only this
thread writes, and timed with two clock reads per exit. Every other exit
(string I/O, system events, errors) is decoded into a typed exit and
dispatched by one ``match``. The loop ends when the machine asks it to stop
(``immediate_exit`` plus a signal) or when an exit says the VM is over.
"""

from __future__ import annotations

import collections
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvmpy.abi import kvm as abi
from kvmpy.bus import AccessCounter, Bus
from kvmpy.errors import GuestError, HostError, KvmpyError
from kvmpy.jail.seccomp import Role, enter_role
from kvmpy.kvm import Vcpu, exits
from kvmpy.kvm.binary_stats import BinaryStats
from kvmpy.kvm.vcpu import EXIT_REASON, IO_FIELDS, MMIO_FIELDS, RUN_IOCTL
from kvmpy.ratelimit import guest_log
from kvmpy.vmm.exit_stats import VcpuExitStats
from kvmpy.vmm.stop import StopKind, StopReason

if TYPE_CHECKING:
    from kvmpy.vmm.machine import Machine

log = logging.getLogger("kvmpy.vcpu")

#: Distinct unclaimed addresses remembered so each logs once (bounded: a guest can probe them all).
MAX_REPORTED_ADDRESSES = 256
#: The signal that kicks a vCPU thread out of KVM_RUN (a no-op handler is installed for it).
KICK_SIGNAL = signal.SIGUSR1

_EXIT_IO = abi.KVM_EXIT_IO
_EXIT_MMIO = abi.KVM_EXIT_MMIO
_IO_OUT = abi.KVM_EXIT_IO_OUT

_SYSTEM_EVENT_NAMES = {
    abi.KVM_SYSTEM_EVENT_SHUTDOWN: "shutdown",
    abi.KVM_SYSTEM_EVENT_RESET: "reset",
    abi.KVM_SYSTEM_EVENT_CRASH: "crash",
}


class VcpuThread(threading.Thread):
    """Runs one vCPU until the machine stops.

    Other threads reach it between two exits: ``call(work)`` runs ``work`` on
    this thread (KVM makes vCPU ioctls from elsewhere wait for the vCPU to
    leave KVM_RUN), and the machine's pause parks it outside KVM_RUN. Both go
    through ``kick()``: queue the request, set ``immediate_exit`` so a
    KVM_RUN about to start returns at once, then signal the thread so a
    KVM_RUN in progress returns. The thread clears ``immediate_exit`` before
    it serves requests, so none is lost between the two.
    """

    def __init__(self, machine: Machine, vcpu: Vcpu) -> None:
        super().__init__(name=f"vcpu{vcpu.id}", daemon=True)
        self.machine = machine
        self.vcpu = vcpu
        self.stats = VcpuExitStats(vcpu.id)
        self.stopping = False
        self._pio: Bus = machine.pio_bus
        self._mmio: Bus = machine.mmio_bus
        #: This thread's way into the buses (lock-free: only this thread counts in them).
        self._pio_dispatch = machine.pio_bus.dispatcher()
        self._mmio_dispatch = machine.mmio_bus.dispatcher()
        #: Unclaimed ports and MMIO addresses already logged (each logs once).
        self._reported_ports: set[int] = set()
        self._reported_mmio: set[int] = set()
        #: Set by other threads when there is something to do between exits.
        self.control = False
        self._requests: collections.deque[Callable[[], None]] = collections.deque()
        #: True while parked outside KVM_RUN by a pause.
        self.parked = False

    # --- control from other threads --------------------------------------------------------
    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN and look at ``control`` (any thread)."""
        self.control = True
        self.vcpu.set_immediate_exit(True)
        ident = self.ident
        if ident is not None and ident != threading.get_ident() and self.is_alive():
            signal.pthread_kill(ident, KICK_SIGNAL)

    def call(self, work: Callable[[], None]) -> None:
        """Run ``work`` on this thread at its next exit (the caller waits for it its own way)."""
        self._requests.append(work)
        self.kick()

    def _serve_control(self) -> None:
        # A stop keeps ``control`` set, so the loop sees it: request_stop sets ``stopping``
        # before ``control``, so one set after this read sets ``control`` again too.
        self.control = self.stopping
        self.vcpu.set_immediate_exit(self.stopping)
        while self._requests:
            self._requests.popleft()()
        if self.machine.pause_requested and not self.stopping:
            self.replay_coalesced()
            self.machine.park(self)

    def run(self) -> None:
        enter_role(Role.VCPU)
        kernel_stats = self._open_kernel_stats()
        try:
            self._loop()
        except HostError as error:
            self.machine.request_stop(self._error_stop(StopKind.HOST_ERROR, f"host error: {error}"))
        except KvmpyError as error:  # neither root: a bug in kvmpy's error handling
            self.machine.request_stop(self._error_stop(StopKind.HOST_ERROR, f"internal error: {error}"))
        except Exception as error:  # a bug in kvmpy: stop the VM, keep the traceback in the log
            log.exception("vCPU %d crashed", self.vcpu.id)
            self.machine.request_stop(
                StopReason(StopKind.HOST_ERROR, 1, f"vCPU {self.vcpu.id}: internal error: {error!r}")
            )
        finally:
            if kernel_stats is not None:
                self.stats.kernel = kernel_stats.read()
                kernel_stats.close()

    def _open_kernel_stats(self) -> BinaryStats | None:
        """KVM's own per-vCPU counters, where the kernel offers them."""
        try:
            return self.vcpu.open_stats()
        except (KvmpyError, OSError):
            return None

    def _loop(self) -> None:
        """Run the vCPU until it stops; every exit is counted, by reason and where it went.

        The common exits (a single port access, an MMIO access) take the short way written
        out here; the rest go through ``_other_exit``. Time is read twice per exit: when
        KVM_RUN returns and when the exit has been handled (that read also starts the next
        one's time in the guest).
        """
        vcpu, stats, ring = self.vcpu, self.stats, self.machine.coalesced
        # Vcpu.enter, written out: a call less per exit.
        ioctl, fd, kvm_run, reason_of = RUN_IOCTL, vcpu.fd, abi.KVM_RUN, EXIT_REASON.unpack_from
        page, mapping = vcpu.page, vcpu.mapping
        io_fields, mmio_fields = IO_FIELDS.unpack_from, MMIO_FIELDS.unpack_from
        mmio_data = vcpu.mmio_data_offset
        pio_read, pio_write = self._pio_dispatch.read, self._pio_dispatch.write
        mmio_read, mmio_write = self._mmio_dispatch.read, self._mmio_dispatch.write
        io_exits, mmio_exits, ports = stats.counter("io"), stats.counter("mmio"), stats.ports
        reported_ports, reported_mmio = self._reported_ports, self._reported_mmio
        # The coalesced ring's first and last indices: writes are buffered when they differ.
        buffered = ring.indices if ring is not None else memoryview(bytearray(8)).cast("I")
        clock = time.perf_counter_ns
        done = clock()
        while True:
            if self.control:  # set with ``stopping`` too
                if self.stopping:
                    return
                self._serve_control()
                done = clock()
                continue
            try:
                ioctl(fd, kvm_run, 0)
                reason = reason_of(page)[0]
            except OSError as error:
                reason = vcpu.interrupted(error)
            returned = clock()
            stats.guest_ns += returned - done
            charged = None
            if buffered[0] != buffered[1]:
                self._replay_guarded(reason)
            try:
                if reason == _EXIT_IO:
                    io_exits.count += 1
                    direction, size, port, count, offset = io_fields(page)
                    ports[port] += 1
                    if count != 1:  # string I/O (REP INS/OUTS)
                        charged = self._port_io(vcpu.decode_io())
                    elif direction == _IO_OUT:
                        charged = pio_write(port, mapping[offset : offset + size])
                        if charged is None and port not in reported_ports:
                            self._report_unhandled("port", port, True, size)
                    else:
                        charged = pio_read(port, page[offset : offset + size])
                        if charged is None and port not in reported_ports:
                            self._report_unhandled("port", port, False, size)
                    done = clock()
                    io_exits.handle_ns += done - returned
                elif reason == _EXIT_MMIO:
                    mmio_exits.count += 1
                    address, length, is_write = mmio_fields(page)  # KVM keeps length <= 8
                    if is_write:
                        charged = mmio_write(address, mapping[mmio_data : mmio_data + length])
                    else:
                        charged = mmio_read(address, page[mmio_data : mmio_data + length])
                    if charged is None and address not in reported_mmio:
                        self._report_unhandled("MMIO", address, bool(is_write), length)
                    done = clock()
                    mmio_exits.handle_ns += done - returned
                else:
                    stop = self._other_exit(vcpu.decode(reason), returned)
                    done = clock()
                    if stop is not None:
                        self.machine.request_stop(stop)
                        return
                    continue
            except GuestError as error:  # the guest's fault: contained, counted, the VM goes on
                counter = io_exits if reason == _EXIT_IO else mmio_exits
                self._guest_error(_REASON_NAMES[reason], error)
                done = clock()
                counter.handle_ns += done - returned
                continue
            if charged is not None:  # the device's share: the Python time of its exits
                charged.handle_ns += done - returned

    def _replay_guarded(self, reason: int) -> None:
        try:
            self.replay_coalesced()
        except GuestError as error:  # a buffered write the device refused: as for any exit
            name = _REASON_NAMES.get(reason) or self.vcpu.decode(reason).reason
            self._guest_error(name, error)

    def _other_exit(self, exit_: exits.VmExit, returned: int) -> StopReason | None:
        """An exit the short way does not take: dispatched on its type, counted by reason."""
        counter = self.stats.counter(exit_.reason)
        counter.count += 1
        try:
            return self._handle(exit_)
        except GuestError as error:  # the guest's fault: contained, counted, the VM goes on
            self._guest_error(exit_.reason, error)
            return None
        finally:
            counter.handle_ns += time.perf_counter_ns() - returned

    def _handle(self, exit_: exits.VmExit) -> StopReason | None:
        match exit_:
            case exits.PortIo():
                self._port_io(exit_)
            case exits.Mmio():
                self._mmio_access(exit_)
            case exits.Interrupted():
                pass
            case exits.SystemEvent(type=event_type):
                return self._system_event(event_type, exit_.data)
            case exits.Shutdown():
                return self._error_stop(
                    StopKind.GUEST_ERROR, f"vCPU {self.vcpu.id}: guest triple fault (KVM_EXIT_SHUTDOWN)"
                )
            case exits.InternalError(suberror=suberror, data=data):
                detail = " ".join(f"{word:#x}" for word in data)
                return self._error_stop(
                    StopKind.GUEST_ERROR,
                    f"vCPU {self.vcpu.id}: KVM internal error, suberror {suberror}"
                    f" ({_internal_error_name(suberror)}) data [{detail}]",
                )
            case exits.FailEntry(hardware_reason=reason, cpu=cpu):
                return self._error_stop(
                    StopKind.GUEST_ERROR,
                    f"vCPU {self.vcpu.id}: VM entry failed, hardware reason {reason:#x} on host CPU {cpu}",
                )
            case exits.Halt():
                return self._error_stop(
                    StopKind.GUEST_ERROR, f"vCPU {self.vcpu.id}: HLT with no in-kernel local APIC"
                )
            case _:
                return self._error_stop(
                    StopKind.GUEST_ERROR, f"vCPU {self.vcpu.id}: unhandled exit {exit_!r}"
                )
        return None

    def _guest_error(self, reason: str, error: GuestError) -> None:
        self.stats.guest_errors += 1
        key = ("vcpu-guest-error", reason)
        message = "vCPU %d: guest error on an %s exit: %s (the VM goes on)"
        guest_log.warning(log, key, message, self.vcpu.id, reason, error)

    # --- port I/O and MMIO --------------------------------------------------------------
    def replay_coalesced(self) -> None:
        """Apply the writes KVM buffered (from any vCPU) before this exit is handled."""
        ring = self.machine.coalesced
        if ring is None:
            return
        buffered = self.stats.buffered
        with self.machine.coalesced_lock:
            for write in ring.drain():
                key = (write.is_pio, write.address)
                buffered[key] = buffered.get(key, 0) + 1
                if write.is_pio:
                    handled = self._pio.write(write.address, write.data)
                else:
                    handled = self._mmio.write(write.address, write.data)
                if not handled:
                    self._report_unhandled(
                        "port" if write.is_pio else "MMIO", write.address, True, len(write.data)
                    )

    def _port_io(self, io: exits.PortIo) -> AccessCounter | None:
        """Every access of a port-I/O exit (the exit itself is counted by the caller); the
        counter of the device that took them, None if no device did."""
        size, data = io.size, io.data
        charged = None
        for i in range(io.count):
            chunk = data[i * size : (i + 1) * size]
            if io.is_write:
                handled = self._pio_dispatch.write(io.port, bytes(chunk))
            else:
                handled = self._pio_dispatch.read(io.port, chunk)
            if handled is None:
                self._report_unhandled("port", io.port, io.is_write, size)
            else:
                charged = handled
        return charged

    def _mmio_access(self, mmio: exits.Mmio) -> None:
        if mmio.is_write:
            handled = self._mmio_dispatch.write(mmio.address, bytes(mmio.data))
        else:
            handled = self._mmio_dispatch.read(mmio.address, mmio.data)
        if handled is None:
            self._report_unhandled("MMIO", mmio.address, mmio.is_write, len(mmio.data))

    def _report_unhandled(self, kind: str, address: int, is_write: bool, size: int) -> None:
        reported = self._reported_ports if kind == "port" else self._reported_mmio
        if address in reported:
            return  # each address logs once; the bus counts every access
        if len(reported) < MAX_REPORTED_ADDRESSES:
            reported.add(address)
        access = "write to" if is_write else "read from"
        guest_log.warning(
            log,
            "unclaimed-access",
            "vCPU %d: %d-byte %s unclaimed %s %#x (%s; further ones only counted)",
            self.vcpu.id,
            size,
            access,
            kind,
            address,
            "reads see all-ones" if not is_write else "dropped",
        )

    # --- the end of the VM ------------------------------------------------------------
    def _system_event(self, event_type: int, data: tuple[int, ...]) -> StopReason:
        name = _SYSTEM_EVENT_NAMES.get(event_type, f"type {event_type}")
        if event_type == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
            return StopReason(StopKind.POWEROFF, 0, "guest powered off")
        if event_type == abi.KVM_SYSTEM_EVENT_RESET:
            return StopReason(StopKind.RESET, 0, "guest asked for a reset")
        return self._error_stop(StopKind.GUEST_ERROR, f"vCPU {self.vcpu.id}: system event {name} {data}")

    def _error_stop(self, kind: StopKind, message: str) -> StopReason:
        details: tuple[str, ...] = ()
        try:
            details = describe_registers(self.vcpu)
        except KvmpyError as error:
            details = (f"(registers unavailable: {error})",)
        return StopReason(kind, 1, message, details)


#: The reason names of the exits the short way takes (as the typed exits name them).
_REASON_NAMES = {_EXIT_IO: exits.PortIo.reason, _EXIT_MMIO: exits.Mmio.reason}


def describe_registers(vcpu: Vcpu) -> tuple[str, ...]:
    """The vCPU's general and control registers, as lines for an error report."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    names = ["rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp"]
    names += [f"r{i}" for i in range(8, 16)]
    values = [f"{name:>3}={getattr(regs, name):016x}" for name in names]
    lines = ["  " + "  ".join(values[i : i + 4]) for i in range(0, len(values), 4)]
    lines.append(
        f"  rip={regs.rip:016x}  rflags={regs.rflags:08x}  cs={sregs.cs.selector:04x}"
        f"  ss={sregs.ss.selector:04x}  cpl={sregs.cs.dpl}"
    )
    lines.append(
        f"  cr0={sregs.cr0:08x}  cr2={sregs.cr2:016x}  cr3={sregs.cr3:016x}"
        f"  cr4={sregs.cr4:08x}  efer={sregs.efer:x}"
    )
    return tuple(lines)


def _internal_error_name(suberror: int) -> str:
    names: dict[int, str] = {
        abi.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
        abi.KVM_INTERNAL_ERROR_SIMUL_EX: "exception while delivering an exception",
        abi.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    }
    return names.get(suberror, "unknown")


__all__ = ["VcpuThread", "describe_registers"]
