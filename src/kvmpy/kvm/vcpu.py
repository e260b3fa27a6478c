"""A KVM virtual CPU: its registers, and ``run()`` that returns typed exits."""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Sequence

from kvmpy.abi import kvm as abi
from kvmpy.kvm import exits
from kvmpy.kvm.binary_stats import BinaryStats
from kvmpy.kvm.coalesced_ring import CoalescedRing
from kvmpy.kvm.errors import KvmError
from kvmpy.kvm.ioctl import ioctl, libc_ioctl

# KVM_RUN goes through libc directly and is not retried on EINTR: that is how a
# stop request (immediate_exit plus a signal) gets the vCPU thread out of the guest.
_EINTR = 4
_EAGAIN = 11
_EINVAL = 22
_ENOTTY = 25

# The exits taken most often are decoded with one struct.unpack_from on the kvm_run page
# (a ctypes field read builds an object per access); the offsets come from the ABI.
_EXIT_REASON = struct.Struct(f"<{abi.kvm_run.exit_reason.offset}xI")
#: A port-I/O exit's fields, from ``Vcpu.page``: direction, size, port, count, data offset.
IO_FIELDS = struct.Struct(f"<{abi.kvm_run.io.offset}xBBHIQ")
#: An MMIO exit's fields, from ``Vcpu.page``: address, length, is_write (the data is at
#: ``Vcpu.mmio_data_offset``, 8 bytes).
MMIO_FIELDS = struct.Struct(f"<{abi.kvm_run.mmio.offset}xQ8xIB")
_IO = IO_FIELDS
_MMIO = MMIO_FIELDS
assert _IO.size - abi.kvm_run.io.offset == ctypes.sizeof(abi.kvm_run__u0_io)
#: KVM_RUN as the vCPU loop issues it: ``RUN_IOCTL(fd, KVM_RUN, 0)``, then ``EXIT_REASON``.
_KVM_RUN = abi.KVM_RUN
_ioctl = RUN_IOCTL = fcntl.ioctl
EXIT_REASON = _EXIT_REASON


class Vcpu:
    """One vCPU file descriptor and its shared ``kvm_run`` page."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self.fd = fd
        self.id = vcpu_id
        self._mapping = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._page = memoryview(self._mapping)
        #: The shared ``kvm_run`` page, for the exit path's own decoding (``IO_FIELDS``,
        #: ``MMIO_FIELDS``): a memoryview (the handler of a read fills a slice of it) and the
        #: mapping (a slice of it is the bytes a guest wrote, in one step).
        self.page = self._page
        self.mapping = self._mapping
        self.run_state = abi.kvm_run.from_buffer(self._mapping)
        self._ring: CoalescedRing | None = None
        base = ctypes.addressof(self.run_state)
        self.mmio_data_offset = self._mmio_data_offset = ctypes.addressof(self.run_state.mmio.data) - base
        self._decoders: dict[int, Callable[[], exits.VmExit]] = {
            abi.KVM_EXIT_IO: self._decode_io,
            abi.KVM_EXIT_MMIO: self._decode_mmio,
            abi.KVM_EXIT_HLT: lambda: exits.Halt(),
            abi.KVM_EXIT_SHUTDOWN: lambda: exits.Shutdown(),
            abi.KVM_EXIT_SYSTEM_EVENT: self._decode_system_event,
            abi.KVM_EXIT_INTERNAL_ERROR: self._decode_internal_error,
            abi.KVM_EXIT_FAIL_ENTRY: self._decode_fail_entry,
            abi.KVM_EXIT_INTR: lambda: exits.Interrupted(),
            abi.KVM_EXIT_IRQ_WINDOW_OPEN: lambda: exits.IrqWindowOpen(),
            abi.KVM_EXIT_EXCEPTION: self._decode_exception,
        }

    def coalesced_ring(self) -> CoalescedRing | None:
        """The VM's coalesced MMIO/PIO ring, mapped with this vCPU (None if KVM has none)."""
        offset = abi.KVM_COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE
        if self._ring is None and len(self._mapping) >= offset + mmap.PAGESIZE:
            self._ring = CoalescedRing(self._mapping, offset)
        return self._ring

    def close(self) -> None:
        # ctypes keeps an export of the mapping alive through run_state; drop it first.
        del self.run_state
        if self._ring is not None:
            self._ring.close()
        del self.page
        self._page.release()
        try:
            self._mapping.close()
        except BufferError:
            pass
        os.close(self.fd)

    # --- running ----------------------------------------------------------------------
    def run(self) -> exits.VmExit:
        """Enter the guest until the next exit that needs userspace, and decode it."""
        return self.decode(self.enter())

    def enter(self) -> int:
        """Enter the guest until the next exit that needs userspace; its raw exit reason.

        KVM_EXIT_INTR when a signal or ``immediate_exit`` ended KVM_RUN (EINTR; EAGAIN
        too). ``decode`` turns the reason into a typed exit; the vCPU thread's exit path
        reads the fields of the common exits itself (``IO_FIELDS``, ``MMIO_FIELDS``). KVM_RUN
        goes through ``fcntl.ioctl``, which does not retry on EINTR (and costs less per call
        than a ctypes call to libc's ioctl).
        """
        try:
            _ioctl(self.fd, _KVM_RUN, 0)
        except OSError as error:
            return self.interrupted(error)
        reason: int = _EXIT_REASON.unpack_from(self._page)[0]
        return reason

    @staticmethod
    def interrupted(error: OSError) -> int:
        """KVM_EXIT_INTR for a KVM_RUN that a signal or ``immediate_exit`` ended; any other
        failure of KVM_RUN raised as a KvmError."""
        if error.errno in (_EINTR, _EAGAIN):
            return abi.KVM_EXIT_INTR
        raise KvmError("KVM_RUN", error.errno or 0) from None

    def decode(self, reason: int) -> exits.VmExit:
        """The exit ``enter`` returned ``reason`` for, as a typed exit."""
        decode = self._decoders.get(reason)
        if decode is None:
            return exits.UnknownExit(reason, self.run_state.hw.hardware_exit_reason)
        return decode()

    def kvmclock_ctrl(self) -> bool:
        """Tell the guest's kvmclock the vCPU was stopped by the host (Linux's watchdogs then
        forgive the gap). False if the guest has no kvmclock registered (EINVAL) or KVM lacks it."""
        if libc_ioctl(self.fd, abi.KVM_KVMCLOCK_CTRL, 0) < 0:
            errno = ctypes.get_errno()
            if errno in (_EINVAL, _ENOTTY):
                return False
            raise KvmError("KVM_KVMCLOCK_CTRL", errno)
        return True

    def set_immediate_exit(self, value: bool) -> None:
        """With this set, KVM_RUN returns at once with EINTR: the race-free way to stop a vCPU.

        A closed vCPU has nothing to stop (a machine stopped again after its close)."""
        try:
            self.run_state.immediate_exit = int(value)
        except AttributeError:
            if hasattr(self, "run_state"):
                raise

    def decode_io(self) -> exits.PortIo:
        """The port-I/O exit just taken, typed (for string I/O: ``count`` accesses)."""
        return self._decode_io()

    def _decode_io(self) -> exits.PortIo:
        direction, size, port, count, start = _IO.unpack_from(self._page)
        length = size * count
        if start + length > len(self._page) or size not in (1, 2, 4):
            raise KvmError("KVM_RUN", 0, f"nonsensical I/O exit at offset {start:#x} size {size}")
        return exits.PortIo(
            port, size, count, direction == abi.KVM_EXIT_IO_OUT, self._page[start : start + length]
        )

    def _decode_mmio(self) -> exits.Mmio:
        address, length, is_write = _MMIO.unpack_from(self._page)
        start = self._mmio_data_offset
        return exits.Mmio(address, bool(is_write), self._page[start : start + min(length, 8)])

    def _decode_system_event(self) -> exits.SystemEvent:
        event = self.run_state.system_event
        count = min(int(event.ndata), 16)
        return exits.SystemEvent(event.type, tuple(event.data[i] for i in range(count)))

    def _decode_internal_error(self) -> exits.InternalError:
        internal = self.run_state.internal
        count = min(int(internal.ndata), 16)
        return exits.InternalError(internal.suberror, tuple(internal.data[i] for i in range(count)))

    def _decode_fail_entry(self) -> exits.FailEntry:
        fail = self.run_state.fail_entry
        return exits.FailEntry(fail.hardware_entry_failure_reason, fail.cpu)

    def _decode_exception(self) -> exits.Exception_:
        ex = self.run_state.ex
        return exits.Exception_(ex.exception, ex.error_code)

    def open_stats(self) -> BinaryStats:
        """KVM's in-kernel counters for this vCPU (exits, halts, I/O handled in the kernel)."""
        fd = ioctl(self.fd, abi.KVM_GET_STATS_FD, 0, name="KVM_GET_STATS_FD")
        return BinaryStats(fd)

    # --- register state ---------------------------------------------------------------
    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        ioctl(self.fd, abi.KVM_GET_REGS, regs, name="KVM_GET_REGS")
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, regs, name="KVM_SET_REGS")

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, sregs, name="KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs, name="KVM_SET_SREGS")

    def get_fpu(self) -> abi.kvm_fpu:
        fpu = abi.kvm_fpu()
        ioctl(self.fd, abi.KVM_GET_FPU, fpu, name="KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, fpu, name="KVM_SET_FPU")

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        msrs = abi.make_msrs(len(indices))
        msrs.nmsrs = len(indices)
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        got = ioctl(self.fd, abi.KVM_GET_MSRS, msrs, name="KVM_GET_MSRS")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(got)}

    def set_msrs(self, values: Iterable[tuple[int, int]]) -> None:
        pairs = list(values)
        msrs = abi.make_msrs(len(pairs))
        msrs.nmsrs = len(pairs)
        for i, (index, data) in enumerate(pairs):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        done = ioctl(self.fd, abi.KVM_SET_MSRS, msrs, name="KVM_SET_MSRS")
        if done != len(pairs):
            failed = pairs[done][0]
            raise KvmError("KVM_SET_MSRS", 22, f"MSR {failed:#x} was refused")

    def set_cpuid(self, entries: Sequence[abi.kvm_cpuid_entry2]) -> None:
        cpuid = abi.make_cpuid2(len(entries))
        cpuid.nent = len(entries)
        for i, entry in enumerate(entries):
            cpuid.entries[i] = entry
        ioctl(self.fd, abi.KVM_SET_CPUID2, cpuid, name="KVM_SET_CPUID2")

    def get_lapic(self) -> abi.kvm_lapic_state:
        lapic = abi.kvm_lapic_state()
        ioctl(self.fd, abi.KVM_GET_LAPIC, lapic, name="KVM_GET_LAPIC")
        return lapic

    def set_lapic(self, lapic: abi.kvm_lapic_state) -> None:
        ioctl(self.fd, abi.KVM_SET_LAPIC, lapic, name="KVM_SET_LAPIC")

    def translate(self, gva: int) -> abi.kvm_translation:
        """KVM's own walk of ``gva`` through the vCPU's current page tables (KVM_TRANSLATE).

        ``valid`` says whether a translation exists; ``physical_address`` is the GPA.
        """
        translation = abi.kvm_translation(linear_address=gva)
        ioctl(self.fd, abi.KVM_TRANSLATE, translation, name="KVM_TRANSLATE")
        return translation

    def get_mp_state(self) -> int:
        state = abi.kvm_mp_state()
        ioctl(self.fd, abi.KVM_GET_MP_STATE, state, name="KVM_GET_MP_STATE")
        return int(state.mp_state)

    def set_mp_state(self, mp_state: int) -> None:
        state = abi.kvm_mp_state(mp_state=mp_state)
        ioctl(self.fd, abi.KVM_SET_MP_STATE, state, name="KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        events = abi.kvm_vcpu_events()
        ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, events, name="KVM_GET_VCPU_EVENTS")
        return events

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events, name="KVM_SET_VCPU_EVENTS")

    def get_xsave(self) -> abi.kvm_xsave:
        xsave = abi.kvm_xsave()
        ioctl(self.fd, abi.KVM_GET_XSAVE, xsave, name="KVM_GET_XSAVE")
        return xsave

    def set_xsave(self, xsave: abi.kvm_xsave) -> None:
        ioctl(self.fd, abi.KVM_SET_XSAVE, xsave, name="KVM_SET_XSAVE")

    def get_xcrs(self) -> abi.kvm_xcrs:
        xcrs = abi.kvm_xcrs()
        ioctl(self.fd, abi.KVM_GET_XCRS, xcrs, name="KVM_GET_XCRS")
        return xcrs

    def set_xcrs(self, xcrs: abi.kvm_xcrs) -> None:
        ioctl(self.fd, abi.KVM_SET_XCRS, xcrs, name="KVM_SET_XCRS")

    def get_debugregs(self) -> abi.kvm_debugregs:
        debugregs = abi.kvm_debugregs()
        ioctl(self.fd, abi.KVM_GET_DEBUGREGS, debugregs, name="KVM_GET_DEBUGREGS")
        return debugregs

    def set_debugregs(self, debugregs: abi.kvm_debugregs) -> None:
        ioctl(self.fd, abi.KVM_SET_DEBUGREGS, debugregs, name="KVM_SET_DEBUGREGS")

    def get_tsc_khz(self) -> int:
        """The guest's TSC frequency in kHz (what its TSC ticks at, wherever it runs)."""
        return ioctl(self.fd, abi.KVM_GET_TSC_KHZ, 0, name="KVM_GET_TSC_KHZ")

    def set_tsc_khz(self, khz: int) -> None:
        ioctl(self.fd, abi.KVM_SET_TSC_KHZ, khz, name="KVM_SET_TSC_KHZ")

    def get_cpuid(self, max_entries: int = 256) -> list[abi.kvm_cpuid_entry2]:
        """The CPUID this vCPU presents (what KVM_SET_CPUID2 gave it)."""
        cpuid = abi.make_cpuid2(max_entries)
        cpuid.nent = max_entries
        ioctl(self.fd, abi.KVM_GET_CPUID2, cpuid, name="KVM_GET_CPUID2")
        return [abi.kvm_cpuid_entry2.from_buffer_copy(cpuid.entries[i]) for i in range(cpuid.nent)]

    def get_all_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """Every MSR of ``indices`` KVM can read; KVM_GET_MSRS stops at the first it cannot,
        so the rest are asked again past it (those it refuses are left out)."""
        values: dict[int, int] = {}
        position = 0
        while position < len(indices):
            chunk = indices[position:]
            got = self.get_msrs(chunk)
            values.update(got)
            position += len(got) + 1  # skip the one KVM refused
        return values


__all__ = ["EXIT_REASON", "IO_FIELDS", "MMIO_FIELDS", "RUN_IOCTL", "Vcpu"]
