"""The seccomp allow lists of each thread role, as data (see kvmpy.jail.seccomp).

Most of it is measured: ``MEASURED`` below is what kvmpy's threads called,
role by role, in the scenarios of tools/seccomp_profile.py, written there by

    PYTHONPATH=src python tools/seccomp_profile.py --write

(strace -f of test guests to their exit code on one and two vCPUs, virtio-blk
with virtio-rng and virtio-console guests, the API flow with monitor routes,
metrics and a snapshot, a restore from it, and a live migration between two
processes). The role "setup" is the main thread before the machine runs.

The rest is written by hand, each with its reason: ``COMMON`` (what every
thread needs to live and what the trap needs to report), ``EXTRA`` (calls the
scenarios cannot reach on this host: tap devices, TCP migration, MSI, rate
limiters, disk flushes, the terminal) and ``REMOVED`` (measured calls a role
does not need once seccomp is on, because kvmpy does them before the filter).
``NEVER`` is refused to every role whatever a measurement says. The PROCESS
filter, the backstop every thread inherits, is the union of all roles.
"""

from __future__ import annotations

import socket
import termios
from dataclasses import dataclass

from kvmpy.abi import kvm as abi
from kvmpy.abi import tun, vfio

# --- measured: written by tools/seccomp_profile.py --write; do not edit by hand ---
MEASURED: dict[str, dict[str, tuple[str, ...]]] = {
    "api": {
        "syscalls": (
            "accept4",
            "clone3",
            "close",
            "exit",
            "futex",
            "getsockname",
            "gettid",
            "ioctl",
            "lseek",
            "madvise",
            "mmap",
            "mprotect",
            "munmap",
            "newfstatat",
            "openat",
            "poll",
            "read",
            "recvfrom",
            "rseq",
            "rt_sigprocmask",
            "sendto",
            "set_robust_list",
        ),
        "ioctls": (
            "FIONBIO",
            "TCGETS",
        ),
        "prctl": (),
        "sockets": (),
    },
    "console": {
        "syscalls": (
            "clock_nanosleep",
            "futex",
            "write",
        ),
        "ioctls": (),
        "prctl": (),
        "sockets": (),
    },
    "event-loop": {
        "syscalls": (
            "clone3",
            "epoll_wait",
            "exit",
            "futex",
            "gettid",
            "ioctl",
            "madvise",
            "mmap",
            "munmap",
            "prctl",
            "preadv2",
            "pwritev2",
            "read",
            "rseq",
            "rt_sigprocmask",
            "set_robust_list",
        ),
        "ioctls": ("KVM_IRQ_LINE",),
        "prctl": ("PR_SET_NAME",),
        "sockets": (),
    },
    "setup": {
        "syscalls": (
            "accept4",
            "access",
            "arch_prctl",
            "bind",
            "brk",
            "clone3",
            "close",
            "epoll_create1",
            "epoll_ctl",
            "eventfd2",
            "execve",
            "fcntl",
            "futex",
            "getcwd",
            "getdents64",
            "getrandom",
            "getsockname",
            "gettid",
            "ioctl",
            "listen",
            "lseek",
            "mmap",
            "mprotect",
            "mremap",
            "munmap",
            "newfstatat",
            "openat",
            "poll",
            "prctl",
            "pread64",
            "prlimit64",
            "read",
            "readlink",
            "recvfrom",
            "rseq",
            "rt_sigaction",
            "rt_sigprocmask",
            "sendto",
            "set_robust_list",
            "set_tid_address",
            "socket",
            "sysinfo",
            "uname",
            "write",
        ),
        "ioctls": (
            "FIONBIO",
            "KVM_CHECK_EXTENSION",
            "KVM_CREATE_IRQCHIP",
            "KVM_CREATE_PIT2",
            "KVM_CREATE_VCPU",
            "KVM_CREATE_VM",
            "KVM_GET_API_VERSION",
            "KVM_GET_LAPIC",
            "KVM_GET_MSR_INDEX_LIST",
            "KVM_GET_SREGS",
            "KVM_GET_SUPPORTED_CPUID",
            "KVM_GET_VCPU_MMAP_SIZE",
            "KVM_IRQFD",
            "KVM_KVMCLOCK_CTRL",
            "KVM_REGISTER_COALESCED_MMIO",
            "KVM_SET_CLOCK",
            "KVM_SET_CPUID2",
            "KVM_SET_DEBUGREGS",
            "KVM_SET_FPU",
            "KVM_SET_IDENTITY_MAP_ADDR",
            "KVM_SET_IRQCHIP",
            "KVM_SET_LAPIC",
            "KVM_SET_MP_STATE",
            "KVM_SET_MSRS",
            "KVM_SET_PIT2",
            "KVM_SET_REGS",
            "KVM_SET_SREGS",
            "KVM_SET_TSC_KHZ",
            "KVM_SET_TSS_ADDR",
            "KVM_SET_USER_MEMORY_REGION",
            "KVM_SET_VCPU_EVENTS",
            "KVM_SET_XCRS",
            "KVM_SET_XSAVE",
            "TCGETS",
            "TIOCGWINSZ",
        ),
        "prctl": ("PR_SET_NAME",),
        "sockets": ("AF_UNIX",),
    },
    "vcpu": {
        "syscalls": (
            "clone3",
            "close",
            "epoll_ctl",
            "eventfd2",
            "exit",
            "futex",
            "getpid",
            "gettid",
            "ioctl",
            "madvise",
            "mmap",
            "mprotect",
            "munmap",
            "prctl",
            "pread64",
            "rseq",
            "rt_sigprocmask",
            "rt_sigreturn",
            "set_robust_list",
            "tgkill",
        ),
        "ioctls": (
            "KVM_GET_LAPIC",
            "KVM_GET_MP_STATE",
            "KVM_GET_REGS",
            "KVM_GET_SREGS",
            "KVM_GET_STATS_FD",
            "KVM_IOEVENTFD",
            "KVM_RUN",
        ),
        "prctl": ("PR_SET_NAME",),
        "sockets": (),
    },
    "vmm": {
        "syscalls": (
            "brk",
            "clone3",
            "close",
            "connect",
            "exit",
            "exit_group",
            "fsync",
            "ftruncate",
            "futex",
            "getdents64",
            "getpid",
            "gettid",
            "ioctl",
            "lseek",
            "madvise",
            "mmap",
            "mprotect",
            "munmap",
            "newfstatat",
            "openat",
            "pipe2",
            "poll",
            "pread64",
            "pselect6",
            "read",
            "recvfrom",
            "rename",
            "rseq",
            "rt_sigaction",
            "rt_sigprocmask",
            "rt_sigreturn",
            "sendto",
            "set_robust_list",
            "shutdown",
            "socket",
            "tgkill",
            "unlink",
            "write",
        ),
        "ioctls": (
            "FIONBIO",
            "KVM_GET_CLOCK",
            "KVM_GET_CPUID2",
            "KVM_GET_DEBUGREGS",
            "KVM_GET_DIRTY_LOG",
            "KVM_GET_IRQCHIP",
            "KVM_GET_LAPIC",
            "KVM_GET_MP_STATE",
            "KVM_GET_MSRS",
            "KVM_GET_MSR_INDEX_LIST",
            "KVM_GET_PIT2",
            "KVM_GET_REGS",
            "KVM_GET_SREGS",
            "KVM_GET_TSC_KHZ",
            "KVM_GET_VCPU_EVENTS",
            "KVM_GET_XCRS",
            "KVM_GET_XSAVE",
            "KVM_KVMCLOCK_CTRL",
            "KVM_SET_USER_MEMORY_REGION",
            "TCGETS",
        ),
        "prctl": (),
        "sockets": ("AF_UNIX",),
    },
}
# --- end of the measured lists ---

#: Every role: thread life (start, exit, the GIL's futex, thread stacks and malloc, which
#: must never trap: the trap handler runs Python code), the vCPU kick's signal return,
#: pthread_kill's getpid, and the trap's own wait (clock_nanosleep) and exit. write is allowed on stderr only
#: (the trap's log line) unless the role writes elsewhere.
COMMON: tuple[str, ...] = (
    # The clocks: the vDSO answers them without a system call on this host, but falls back to
    # the call where the clock source is not the TSC (the lab's: a jailed Debian under kvmpy
    # there ended with status 148 on clock_gettime before this line).
    "clock_gettime", "clock_getres", "gettimeofday", "time", "nanosleep", "getcpu",
    "brk", "clock_nanosleep", "exit", "exit_group", "futex", "getpid", "gettid", "madvise", "mmap",
    "mprotect", "munmap", "restart_syscall", "rseq", "rt_sigprocmask", "rt_sigreturn", "sched_yield",
    "set_robust_list",
)  # fmt: skip

#: Assigning a device (--device vfio=): the container, group and device set-up at start.
VFIO_SETUP = (
    "VFIO_GET_API_VERSION", "VFIO_CHECK_EXTENSION", "VFIO_SET_IOMMU", "VFIO_GROUP_GET_STATUS",
    "VFIO_GROUP_SET_CONTAINER", "VFIO_GROUP_GET_DEVICE_FD", "VFIO_DEVICE_GET_INFO",
    "VFIO_DEVICE_GET_REGION_INFO", "VFIO_DEVICE_GET_IRQ_INFO", "VFIO_IOMMU_MAP_DMA",
    "VFIO_DEVICE_SET_IRQS", "VFIO_DEVICE_RESET",
)  # fmt: skip
#: ... and its release when the VM ends: interrupts off, reset, DMA unmapped, group let go.
VFIO_RELEASE = (
    "VFIO_DEVICE_SET_IRQS", "VFIO_DEVICE_RESET", "VFIO_IOMMU_UNMAP_DMA", "VFIO_GROUP_UNSET_CONTAINER",
)  # fmt: skip

#: Calls and ioctls the scenarios do not reach on this host, by role, each with its reason.
EXTRA: dict[str, dict[str, tuple[str, ...]]] = {
    "setup": {
        # tap devices (virtio-net), TCP migration, rate limiters (timerfd), the terminal.
        "syscalls": ("getsockopt", "setsockopt", "timerfd_create", "timerfd_settime", "fdatasync", "fsync"),
        "ioctls": (
            "TUNSETIFF",
            "TUNSETOFFLOAD",
            "TUNSETVNETHDRSZ",
            "TCSETS",
            "TCSETSW",
            "FIOCLEX",
            # every KVM ioctl kvmpy's builder and restore may issue (MSI routes, features, FPU)
            "KVM_GET_MSR_FEATURE_INDEX_LIST",
            "KVM_SET_GSI_ROUTING",
            "KVM_SIGNAL_MSI",
            "KVM_IOEVENTFD",
            "KVM_IRQ_LINE",
            "KVM_GET_FPU",
            "KVM_GET_CLOCK",
            "KVM_GET_IRQCHIP",
            "KVM_GET_PIT2",
            *VFIO_SETUP,
            *VFIO_RELEASE,  # a set-up that fails part-way releases what it took
        ),
        "sockets": ("AF_INET", "AF_INET6"),
    },
    "vmm": {
        # TCP migration (connect with a timeout asks SO_ERROR); a rate limiter changed by PATCH;
        # the terminal restored at the end; the input thread (it inherits this role) raising the
        # console's interrupt; the monitor's translate (KVM's CPUID for MAXPHYADDR) and the
        # snapshot's FPU state.
        "syscalls": (
            "getsockopt",
            "setsockopt",
            "timerfd_create",
            "timerfd_settime",
            "epoll_ctl",
            "fdatasync",
        ),
        "ioctls": (
            "TCSETS",
            "TCSETSW",
            "KVM_IRQ_LINE",
            "KVM_SIGNAL_MSI",
            "KVM_TRANSLATE",
            "KVM_GET_SUPPORTED_CPUID",
            "KVM_GET_FPU",
            "KVM_IRQFD",
            "KVM_IOEVENTFD",
            *VFIO_RELEASE,  # an assigned device released when the VM ends
            "KVM_SET_USER_MEMORY_REGION",  # ... its BARs' memory slots removed first
        ),
        "sockets": ("AF_INET", "AF_INET6"),
    },
    "vcpu": {
        # MMIO and port handlers signal eventfds and raise interrupts (INTx, MSI, MSI-X routes);
        # work another thread hands the vCPU (Machine.on_vcpu) reads any of its state; the
        # driver's DRIVER_OK write sets the tap's offloads from the features it acknowledged
        # (seen in the lab: Linux's virtio_net under a jailed kvmpy ended with 148 on it).
        # A queue notified by a write the ioeventfd does not match (1, 4 or 8 bytes) is served
        # on the vCPU thread: the back ends' calls too (disk, tap, rng, rate-limit timers).
        # An assigned device's configuration space and trapped BAR parts are pread/pwrite on its
        # fd; the guest's MSI-X or INTx enable is VFIO_DEVICE_SET_IRQS, and a BAR it moves moves
        # that BAR's memory slot.
        "syscalls": (
            "write", "read", "epoll_ctl", "preadv", "pwritev", "preadv2", "pwritev2", "pwrite64",
            "fdatasync", "fsync", "fallocate", "readv", "writev", "getrandom", "timerfd_settime",
            "pread64",
        ),  # fmt: skip
        "ioctls": (
            "TUNSETOFFLOAD",
            "KVM_IRQ_LINE",
            "KVM_SIGNAL_MSI",
            "KVM_SET_GSI_ROUTING",
            "KVM_IRQFD",
            "KVM_GET_FPU",
            "KVM_GET_XSAVE",
            "KVM_GET_MSRS",
            "KVM_GET_VCPU_EVENTS",
            "KVM_GET_DEBUGREGS",
            "KVM_GET_XCRS",
            "KVM_GET_CPUID2",
            "KVM_GET_TSC_KHZ",
            "KVM_TRANSLATE",
            "KVM_KVMCLOCK_CTRL",
            "KVM_SET_USER_MEMORY_REGION",
            "VFIO_DEVICE_SET_IRQS",
        ),
    },
    "event-loop": {
        # tap read/write (virtio-net), disk flushes, discard and write-zeroes (fallocate: seen in
        # the lab, where a jailed Debian's ext4 discards), virtio-rng, rate limiters' timerfds,
        # handlers removed on this thread, MSI and INTx interrupts.
        "syscalls": (
            "fallocate",
            "write",
            "readv",
            "writev",
            "preadv",
            "pwritev",
            "pread64",
            "pwrite64",
            "fdatasync",
            "fsync",
            "getrandom",
            "timerfd_settime",
            "epoll_ctl",
        ),
        "ioctls": ("KVM_SIGNAL_MSI", "KVM_IRQ_LINE"),
    },
    "api": {},
    # A socket console's sink sends; its timeouts poll.
    "console": {"syscalls": ("sendto", "poll")},
}

#: Measured calls a role does not keep: the API server imports its request parsers before it
#: loads its filter when seccomp is on (they load lazily otherwise), so it opens no files.
REMOVED: dict[str, dict[str, tuple[str, ...]]] = {
    "api": {"syscalls": ("openat", "newfstatat", "lseek", "read"), "ioctls": ("TCGETS",)},
}

#: Refused to every role: new programs, processes (clone is allowed for threads only, see
#: seccomp._build), debugging, mounts and the rest of what a jail must keep out.
NEVER = frozenset({
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "setns", "unshare", "init_module", "finit_module",
    "kexec_load", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
})  # fmt: skip

#: The ioctl every exit passes through (seccomp tests ioctl first where it is allowed).
KVM_RUN = abi.KVM_RUN

_PRCTL_OPTIONS = {"PR_SET_NAME": 15, "PR_SET_NO_NEW_PRIVS": 38, "PR_GET_NAME": 16}
_ROLES = ("setup", "vmm", "vcpu", "event-loop", "api", "console")
#: The console's writer thread starts on whichever thread writes output first (a vCPU for the
#: 16550A, the event loop for virtio-console) and inherits its filter, so those roles keep
#: the console role's calls as well.
_STARTS = {"vmm": ("console",), "vcpu": ("console",), "event-loop": ("console",)}


@dataclass(frozen=True, slots=True)
class Allowed:
    """One role's list: plain calls, ioctl requests, prctl options, socket families."""

    syscalls: frozenset[str]
    ioctls: frozenset[int]
    prctl_options: frozenset[int]
    socket_families: frozenset[int]


def allowed(role: str) -> Allowed:
    """The allow list of ``role`` (a kvmpy.jail.seccomp.Role value); "process" is every role's."""
    if role == "process":
        parts = [_role(name) for name in _ROLES]
        return Allowed(
            frozenset().union(*(p.syscalls for p in parts)),
            frozenset().union(*(p.ioctls for p in parts)),
            frozenset().union(*(p.prctl_options for p in parts)),
            frozenset().union(*(p.socket_families for p in parts)),
        )
    return _role(role)


def _role(role: str) -> Allowed:
    def part(key: str) -> set[str]:
        names = set(MEASURED.get(role, {}).get(key, ())) | set(EXTRA.get(role, {}).get(key, ()))
        return names - set(REMOVED.get(role, {}).get(key, ()))

    syscalls = (part("syscalls") | set(COMMON)) - NEVER
    for started in _STARTS.get(role, ()):
        syscalls |= _role(started).syscalls
    return Allowed(
        frozenset(syscalls),
        frozenset(ioctl_number(name) for name in part("ioctls")),
        frozenset(_PRCTL_OPTIONS[name] for name in part("prctl") if name in _PRCTL_OPTIONS),
        frozenset(getattr(socket, name) for name in part("sockets")),
    )


def ioctl_number(name: str) -> int:
    """An ioctl request by the name kvmpy (or the kernel's termios and tun headers) gives it."""
    if name.startswith("0x"):
        return int(name, 16)
    for module in (abi, tun, vfio, termios):
        value = getattr(module, name, None)
        if isinstance(value, int):
            return value
    raise KeyError(f"unknown ioctl {name}")


__all__ = ["COMMON", "EXTRA", "MEASURED", "NEVER", "REMOVED", "Allowed", "allowed", "ioctl_number"]
