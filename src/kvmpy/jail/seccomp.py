"""Seccomp filters per thread role: what each kvmpy thread may still ask the kernel.

A filter belongs to a thread and is inherited by the threads it creates; filters
stack, and the strictest answer of the stack wins. So :func:`enable` loads the
PROCESS filter (the union of every role, the backstop for any thread) on the
main thread before any other thread exists, and each thread then calls
:func:`enter_role` first thing, which narrows it to its role's list. A thread
kvmpy does not know of keeps the union it inherited. The lists are data in
:mod:`kvmpy.jail.seccomp_lists`, measured with tools/seccomp_profile.py.

The main thread narrows itself to the VMM role once the machine runs (no
KVM_RUN, no KVM_CREATE_VM or KVM_CREATE_VCPU). A guest reboot would build a new
machine with new vCPU threads from that thread, so a VMM with seccomp treats a
reboot as the end of the VM (``on_reboot=exit``, as Firecracker does): that is
what keeps KVM_RUN on vCPU threads only.

A disallowed call does not run: the kernel sends SIGSYS to the thread that made
it (SECCOMP_RET_TRAP). The handler, installed with ``sigaction(SA_SIGINFO)``
through ctypes because Python's ``signal`` module neither passes the siginfo
nor runs handlers on the thread that got the signal, writes one line naming
the call and the thread, counts it, lets a helper thread flush the metrics
(bounded by a timeout: the trapping thread may hold a lock the flush needs)
and ends the process with :data:`SECCOMP_EXIT_STATUS`. Everything the handler
uses (the syscall names, the helper thread) is prepared in :func:`enable`, so
the handler calls nothing a filter might refuse and allocates only small Python
objects: the trapped call is never one of malloc's own (mmap, brk, munmap and
madvise are allowed in every role). The one libc path that traps with malloc's
locks held is fork (it takes them before clone): then the metrics are not
flushed, as the flush would wait for those locks forever.

Without :func:`enable` nothing here loads libseccomp: :func:`enter_role` only
names the thread for the kernel (``ps -L``, the profile tool, the fault log).
"""

from __future__ import annotations

import ctypes
import enum
import errno
import os
import threading
import time
from collections.abc import Callable
from typing import Any

#: The exit status of a VMM ended by a disallowed system call (Firecracker's too).
SECCOMP_EXIT_STATUS = 148
#: How long the trap waits for the metrics to be flushed before it exits anyway.
FLUSH_TIMEOUT_SECONDS = 2.0


class Role(enum.Enum):
    """The kind of kvmpy thread a filter is made for."""

    PROCESS = "process"  # the union of every role: the main thread before the VM runs, unknown threads
    VMM = "vmm"  # the main thread once the machine runs: actions, snapshots, migration
    VCPU = "vcpu"
    EVENT_LOOP = "event-loop"
    API = "api"
    CONSOLE = "console"


#: The kernel's name for each role's threads (15 bytes at most); vCPUs add their Python name.
_KERNEL_NAMES = {
    Role.PROCESS: "kvmpy",
    Role.VMM: "kvmpy-vmm",
    Role.VCPU: "kvmpy-",
    Role.EVENT_LOOP: "kvmpy-events",
    Role.API: "kvmpy-api",
    Role.CONSOLE: "kvmpy-console",
}

_PR_SET_NAME = 15
_SA_SIGINFO = 4
_SIGSYS = 31
_CLONE_THREAD = 0x00010000
_IOCTL_REQUEST_MASK = 0xFFFFFFFF  # the kernel reads the request as an unsigned int

_libc = ctypes.CDLL(None, use_errno=True)
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_libc.prctl.restype = ctypes.c_int

_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


class _Sigaction(ctypes.Structure):
    """glibc's struct sigaction on x86-64 (glibc fills in sa_restorer itself)."""

    _fields_ = [
        ("sa_sigaction", _HANDLER),
        ("sa_mask", ctypes.c_ulong * 16),
        ("sa_flags", ctypes.c_int),
        ("sa_restorer", ctypes.c_void_p),
    ]


class _State:
    """What enable() prepared: the filters and everything the trap handler needs."""

    def __init__(self, flush: Callable[[], None] | None) -> None:
        self.filters: dict[Role, Any] = {}
        self.names: dict[int, str] = {}
        self.flush = flush
        self.load_lock = threading.Lock()  # libseccomp's context is not safe to load from two threads
        #: The trap wakes the flushing thread through this pipe: a write allocates nothing.
        self.wake_read, self.wake_write = os.pipe()
        self.flushed = False


_state: _State | None = None
_faults = 0
_handler_ref: Any = None  # the ctypes callback must outlive enable()


def enabled() -> bool:
    return _state is not None


def faults() -> int:
    """How many disallowed calls were trapped (the metrics' ``seccomp.num_faults``)."""
    return _faults


def set_thread_name(name: str) -> None:
    """The kernel's name of the calling thread (``ps -L``, /proc/PID/task/TID/comm)."""
    _libc.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def enter_role(role: Role) -> None:
    """Called first thing by each thread: names it and, with seccomp enabled, loads its role's filter."""
    prefix = _KERNEL_NAMES[role]
    set_thread_name(prefix + threading.current_thread().name if role is Role.VCPU else prefix)
    state = _state
    if state is None or role is Role.PROCESS:  # the PROCESS filter is every thread's already
        return
    with state.load_lock:
        state.filters[role].load()


def enable(metrics_flush: Callable[[], None] | None = None) -> None:
    """Install the SIGSYS handling and load the PROCESS filter on the calling (main) thread.

    Called once when the jail is entered, before any other kvmpy thread starts;
    from then on :func:`enter_role` loads each thread's filter.
    """
    global _state
    if _state is not None:
        raise RuntimeError("seccomp is already enabled")
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("seccomp.enable() must run on the main thread")
    import pyseccomp

    from kvmpy.jail import seccomp_lists

    state = _State(metrics_flush)
    state.filters = {role: _build(pyseccomp, seccomp_lists, role, state.wake_write) for role in Role}
    state.names = _syscall_names(pyseccomp)
    _preload_unwinder()
    _install_handler()
    state.filters[Role.PROCESS].load()
    _state = state
    if metrics_flush is not None:
        threading.Thread(target=_flush_on_fault, args=(state,), name="seccomp-fault", daemon=True).start()


def _build(pyseccomp: Any, lists: Any, role: Role, wake_fd: int) -> Any:
    """A libseccomp filter that allows ``role``'s calls and traps every other."""
    allowed = lists.allowed(role.value)
    rules = pyseccomp.SyscallFilter(pyseccomp.TRAP)
    rules.set_attr(pyseccomp.Attr.ACT_BADARCH, pyseccomp.TRAP)  # i386 and x32 calls trap too
    if role is not Role.PROCESS:
        rules.set_attr(pyseccomp.Attr.CTL_NNP, 0)  # no_new_privs is set with the first filter
    for name in sorted(allowed.syscalls):
        if name in _ARGUMENT_RULES:
            continue
        rules.add_rule(pyseccomp.ALLOW, name)
    # glibc's pthread_create tries clone3 first and falls back to clone when told ENOSYS;
    # clone's flags can be checked (clone3's are behind a pointer): threads yes, processes no.
    rules.add_rule(pyseccomp.ERRNO(errno.ENOSYS), "clone3")
    if allowed.syscalls & {"clone", "clone3"}:
        thread = pyseccomp.Arg(0, pyseccomp.MASKED_EQ, _CLONE_THREAD, _CLONE_THREAD)
        rules.add_rule(pyseccomp.ALLOW, "clone", thread)
    if "write" not in allowed.syscalls:  # the trap's log line, and its wake-up of the flush
        for fd in (2, wake_fd):
            rules.add_rule(pyseccomp.ALLOW, "write", pyseccomp.Arg(0, pyseccomp.EQ, fd))
    # Naming the thread, and (the PROCESS role) what the libraries ask prctl for.
    for option in {_PR_SET_NAME, *allowed.prctl_options}:
        rules.add_rule(pyseccomp.ALLOW, "prctl", pyseccomp.Arg(0, pyseccomp.EQ, option))
    # Loading the next role's filter: a new filter can only take permissions away.
    rules.add_rule(pyseccomp.ALLOW, "seccomp", pyseccomp.Arg(0, pyseccomp.EQ, _SECCOMP_SET_MODE_FILTER))
    for family in sorted(allowed.socket_families):
        rules.add_rule(pyseccomp.ALLOW, "socket", pyseccomp.Arg(0, pyseccomp.EQ, family))
    if "tgkill" in allowed.syscalls:  # the vCPU kick: this process only
        rules.add_rule(pyseccomp.ALLOW, "tgkill", pyseccomp.Arg(0, pyseccomp.EQ, os.getpid()))
    for request in sorted(allowed.ioctls):
        arg = pyseccomp.Arg(1, pyseccomp.MASKED_EQ, _IOCTL_REQUEST_MASK, request)
        rules.add_rule(pyseccomp.ALLOW, "ioctl", arg)
    if allowed.ioctls and lists.KVM_RUN in allowed.ioctls:
        rules.syscall_priority("ioctl", 255)  # every exit passes here: test ioctl first
    return rules


_SECCOMP_SET_MODE_FILTER = 1
#: Calls whose rules look at their arguments (added by _build, not as plain names).
_ARGUMENT_RULES = frozenset({"clone", "clone3", "prctl", "seccomp", "socket", "tgkill", "ioctl"})


def _syscall_names(pyseccomp: Any) -> dict[int, str]:
    """Number -> name for every x86-64 call, resolved now: the trap handler must not call libseccomp."""
    names = {}
    for number in range(512):
        try:
            name = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, number)
        except (OSError, ValueError):
            continue
        if name:
            names[number] = name.decode()
    return names


_unwinder: Any = None  # libgcc_s, kept loaded for glibc's pthread_exit


def _preload_unwinder() -> None:
    """Load libgcc_s now, while the filters still allow opening files.

    glibc's pthread_exit unwinds the thread's stack with libgcc_s, which it
    dlopens on first use. Python calls pthread_exit for a daemon thread that
    wakes while the interpreter finalizes (the VMM's exit), so that dlopen ran
    under a role's filter: its openat trapped, the handler (Python, which no
    longer runs during finalization) could not report it, and the second trap
    with SIGSYS blocked killed the process with status 159 and no message.
    """
    global _unwinder
    try:
        _unwinder = ctypes.CDLL("libgcc_s.so.1")
    except OSError:  # a static or musl Python: then glibc's unwinder is not used either
        _unwinder = None


def _install_handler() -> None:
    global _handler_ref
    _handler_ref = _HANDLER(_on_sigsys)
    action = _Sigaction()
    action.sa_sigaction = _handler_ref
    action.sa_flags = _SA_SIGINFO
    _libc.sigaction.argtypes = [ctypes.c_int, ctypes.POINTER(_Sigaction), ctypes.c_void_p]
    if _libc.sigaction(_SIGSYS, ctypes.byref(action), None) != 0:
        raise OSError(ctypes.get_errno(), "sigaction(SIGSYS) failed")


#: Where the trapped call's second argument (RSI) is in an x86-64 ``ucontext_t``: uc_flags,
#: uc_link and the 24-byte uc_stack come first (40 bytes), then mcontext's gregs, RSI the 10th.
_UCONTEXT_RSI_OFFSET = 40 + 9 * 8


def _ioctl_request(context: int) -> int:
    """The request number of a trapped ioctl, from the registers the kernel saved for the handler."""
    return ctypes.c_uint64.from_address(context + _UCONTEXT_RSI_OFFSET).value & _IOCTL_REQUEST_MASK


def _on_sigsys(signo: int, info: int | None, context: int | None) -> None:
    """The trap: one line naming the call and the thread, the count, the metrics, the exit."""
    global _faults
    _faults += 1
    state = _state
    number = arch = -1
    if info:  # x86-64 siginfo: si_signo, si_errno, si_code; at 16 si_call_addr, si_syscall, si_arch
        number = ctypes.c_int.from_address(info + 24).value
        arch = ctypes.c_uint.from_address(info + 28).value
    name = state.names.get(number, "?") if state is not None and arch == _AUDIT_ARCH_X86_64 else "?"
    thread = threading.current_thread()
    tid = thread.native_id if thread.native_id is not None else -1
    detail = f" request {_ioctl_request(context):#x}" if name == "ioctl" and context else ""
    line = (
        f"kvmpy: seccomp: disallowed system call {number} ({name}){detail} on thread {tid} ({thread.name});"
        f" exiting with status {SECCOMP_EXIT_STATUS}\n"
    )
    if arch != _AUDIT_ARCH_X86_64:
        line = line.replace(" on thread", f" of architecture {arch:#x} on thread")
    try:
        os.write(2, line.encode())
    except OSError:
        pass
    if state is not None and state.flush is not None and name not in _HOLDS_MALLOC_LOCKS:
        try:
            os.write(state.wake_write, b"!")
        except OSError:
            pass
        for _ in range(_FLUSH_POLLS):  # sleeping allocates nothing; an Event's wait would
            if state.flushed:
                break
            time.sleep(FLUSH_TIMEOUT_SECONDS / _FLUSH_POLLS)
    os._exit(SECCOMP_EXIT_STATUS)


_FLUSH_POLLS = 100
#: glibc's fork takes malloc's locks before it calls clone: a flush (which allocates, holding
#: the GIL) would wait for them forever, and so would this handler for the GIL.
_HOLDS_MALLOC_LOCKS = frozenset({"clone", "clone3", "fork", "vfork"})


_AUDIT_ARCH_X86_64 = 0xC000003E


def _flush_on_fault(state: _State) -> None:
    """The helper thread: flushes the metrics for the trap handler, which then exits."""
    try:
        os.read(state.wake_read, 1)
        if state.flush is not None:
            state.flush()
    except Exception:  # noqa: BLE001 - the process ends anyway
        pass
    state.flushed = True


__all__ = ["SECCOMP_EXIT_STATUS", "Role", "enable", "enabled", "enter_role", "faults", "set_thread_name"]
