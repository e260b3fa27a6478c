"""Seccomp filters per thread role: kvmpy runs under them, and what a role must not do ends the VMM.

The escape attempts run in a child Python that enables kvmpy's filters exactly as
the jail does (``seccomp.enable()`` on the main thread, ``enter_role`` on a thread
of the role) and then makes the forbidden call: the child must end with status
148 and one line naming the call and the thread.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvmpy.jail.seccomp import SECCOMP_EXIT_STATUS
from kvmpy.testing.process import SOURCE, kvmpy, proc_status, read_until, start_kvmpy


def _threads(pid: int) -> dict[str, list[int]]:
    """Kernel thread name -> the Seccomp_filters count of each thread with that name."""
    found: dict[str, list[int]] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = proc_status(task / "status")
        except OSError:
            continue  # the thread ended meanwhile
        found.setdefault(fields["Name"], []).append(int(fields["Seccomp_filters"]))
    return found


def _run_counter(
    guests: Path, *extra: str
) -> tuple[subprocess.Popen[str], dict[str, str], dict[str, list[int]]]:
    process = start_kvmpy(
        "run", "--kernel", str(guests / "counter.elf"), "--cmdline", "gap=20000000 ticks=12", "--cpus", "2",
        *extra,
    )  # fmt: skip
    seen = read_until(process, lambda text: "tick 3" in text, timeout=30)
    assert "tick 3" in seen, seen
    status = proc_status(Path(f"/proc/{process.pid}/status"))
    threads = _threads(process.pid)
    return process, status, threads


@pytest.mark.kvm
def test_a_guest_runs_to_its_end_under_the_filters_and_each_thread_has_its_role(guests: Path) -> None:
    process, status, threads = _run_counter(guests, "--seccomp")
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert status["Seccomp"] == "2", status  # filter mode
    # The process filter plus the role's own; the console writer starts on a vCPU and adds its own.
    assert threads["kvmpy-vmm"] == [2], threads
    assert sorted(threads["kvmpy-vcpu0"] + threads["kvmpy-vcpu1"]) == [2, 2], threads
    assert threads["kvmpy-events"] == [2], threads
    assert threads.get("kvmpy-console", [3]) == [3], threads
    assert "seccomp" not in err


@pytest.mark.kvm
def test_without_seccomp_no_thread_has_a_filter(guests: Path) -> None:
    process, status, threads = _run_counter(guests)
    process.communicate(timeout=60)
    assert process.returncode == 0
    assert status["Seccomp"] == "0"
    assert "kvmpy-vcpu0" in threads and all(count == 0 for counts in threads.values() for count in counts)


def test_the_unjailed_path_does_not_load_libseccomp() -> None:
    code = "import kvmpy.cli, kvmpy.vmm.vmm, kvmpy.vmm.machine, sys; print('pyseccomp' in sys.modules)"
    done = _python(code)
    assert done.stdout.strip() == "False", done.stderr


def _python(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, PYTHONPATH=str(SOURCE)),
    )


#: Runs ATTEMPT on a thread named THREAD in role ROLE (or on the main thread, narrowed to
#: ROLE, when THREAD is "main") after kvmpy's seccomp is enabled; prints "allowed" first
#: and "not stopped" if the attempt returns.
_ESCAPE = """
import ctypes, os, socket, sys, threading
from kvmpy.jail import seccomp
libc = ctypes.CDLL(None, use_errno=True)
flushed = sys.argv[1]

def flush():
    with open(flushed, "w") as file:
        file.write(str(seccomp.faults()))

seccomp.enable(metrics_flush=flush)

def attempt():
    seccomp.enter_role(seccomp.Role.{role})
    os.getpid(); os.write(2, b"allowed\\n")  # the role's filter lets ordinary calls through
{attempt}
    os.write(2, b"not stopped\\n")

if "{thread}" == "main":
    attempt()
else:
    thread = threading.Thread(target=attempt, name="{thread}")
    thread.start()
    thread.join()
os._exit(0)
"""

_KVM_RUN = 0xAE80
_KVM_CREATE_VCPU = 0xAE41
_KVM_SET_NESTED_STATE = 0x4080AEBF

_ATTEMPTS = {
    "execve": "    os.execv('/bin/true', ['true'])",
    "fork": "    os.fork()",
    "spawn": "    os.posix_spawn('/bin/true', ['true'], {})",
    "socket": "    socket.socket(socket.AF_INET, socket.SOCK_STREAM)",
    "kvm_run": f"    libc.ioctl(0, ctypes.c_ulong({_KVM_RUN}), 0)",
    "kvm_create_vcpu": f"    libc.ioctl(0, ctypes.c_ulong({_KVM_CREATE_VCPU}), 0)",
    "kvm_unlisted": f"    libc.ioctl(0, ctypes.c_ulong({_KVM_SET_NESTED_STATE}), 0)",
    "ptrace": "    libc.ptrace(0, 0, None, None)",  # PTRACE_TRACEME
    "mount": "    libc.mount(b'none', b'/mnt', b'tmpfs', 0, None)",
}


@pytest.mark.parametrize(
    ("role", "thread", "attempt", "syscall"),
    [
        ("VCPU", "vcpu0", "execve", "execve"),
        ("VCPU", "vcpu0", "fork", "clone"),
        ("VCPU", "vcpu0", "socket", "socket"),
        ("VCPU", "vcpu0", "kvm_create_vcpu", "ioctl"),
        ("API", "kvmpy-api", "kvm_run", "ioctl"),
        ("API", "kvmpy-api", "spawn", "clone"),
        ("EVENT_LOOP", "device-events", "kvm_run", "ioctl"),
        ("EVENT_LOOP", "device-events", "ptrace", "ptrace"),
        ("CONSOLE", "console-output", "socket", "socket"),
        ("VMM", "main", "kvm_run", "ioctl"),
        ("VMM", "main", "mount", "mount"),
        ("PROCESS", "main", "kvm_unlisted", "ioctl"),
        ("PROCESS", "library-thread", "ptrace", "ptrace"),
        ("PROCESS", "library-thread", "execve", "execve"),
    ],
)
def test_an_escape_attempt_ends_the_process_with_the_seccomp_status(
    tmp_path: Path, role: str, thread: str, attempt: str, syscall: str
) -> None:
    flushed = tmp_path / "faults"
    code = _ESCAPE.format(role=role, thread=thread, attempt=_ATTEMPTS[attempt])
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), str(flushed)],
        capture_output=True,
        text=True,
        timeout=30,
        env=dict(os.environ, PYTHONPATH=str(SOURCE)),
    )
    lines = [line for line in done.stderr.splitlines() if line]
    assert lines[0] == "allowed" and "not stopped" not in done.stderr, done.stderr
    if attempt == "spawn":  # glibc blocks every signal around posix_spawn's clone: the kernel's SIGSYS kills
        assert done.returncode == -signal.SIGSYS, done.stderr
        return
    assert done.returncode == SECCOMP_EXIT_STATUS, done.stderr
    trap = [line for line in lines if "seccomp:" in line]
    assert len(trap) == 1, done.stderr
    name = "MainThread" if thread == "main" else thread
    request = r" request 0x[0-9a-f]+" if syscall == "ioctl" else ""  # an ioctl names its request too
    assert re.search(rf"\({syscall}\){request} on thread ", trap[0]) and f"({name})" in trap[0], trap[0]
    if syscall != "clone":  # fork holds malloc's locks: no flush then (see seccomp._on_sigsys)
        assert flushed.read_text() == "1"  # counted, and the metrics flushed before the exit


def test_the_filters_of_each_role_differ_where_they_must() -> None:
    from kvmpy.abi import kvm as abi
    from kvmpy.jail.seccomp_lists import NEVER, allowed

    roles = {name: allowed(name) for name in ("process", "vmm", "vcpu", "event-loop", "api", "console")}
    assert abi.KVM_RUN in roles["vcpu"].ioctls
    assert all(abi.KVM_RUN not in roles[name].ioctls for name in ("vmm", "event-loop", "api", "console"))
    assert abi.KVM_CREATE_VM not in roles["vmm"].ioctls and abi.KVM_CREATE_VCPU not in roles["vmm"].ioctls
    assert not roles["api"].ioctls - {0x5421}  # FIONBIO (socket timeouts) and nothing of KVM
    assert "openat" not in roles["api"].syscalls and "openat" not in roles["vcpu"].syscalls
    assert not roles["vcpu"].socket_families and not roles["event-loop"].socket_families
    for name, role in roles.items():
        assert not role.syscalls & NEVER, name
        assert role.syscalls <= roles["process"].syscalls and role.ioctls <= roles["process"].ioctls, name


#: A flat 64-bit guest that pulses the i8042's reset line: mov al, 0xfe; out 0x64, al; hlt.
#: A daemon thread in a role that may not open files, still running when the main thread exits.
_DAEMON_AT_EXIT = """
import sys, threading, time
from kvmpy.jail import seccomp
seccomp.enable()

def spin():
    seccomp.enter_role(seccomp.Role.{role})
    while True:
        time.sleep(0.001)

threading.Thread(target=spin, daemon=True).start()
time.sleep(0.1)
seccomp.enter_role(seccomp.Role.VMM)
sys.exit(0)
"""


@pytest.mark.parametrize("role", ["VCPU", "CONSOLE"])
def test_a_daemon_thread_waking_during_the_exit_does_not_kill_the_process(role: str) -> None:
    """Python ends such a thread with pthread_exit, and glibc's unwinder (libgcc_s) was
    dlopened under the role's filter: its openat trapped while Python could no longer run the
    handler, and the process died of SIGSYS (status 159) with no message. The passthrough lab's
    VMM with an assigned device did this at its exit."""
    done = _python(_DAEMON_AT_EXIT.format(role=role))
    assert done.returncode == 0, (done.returncode, done.stderr)
    assert "seccomp" not in done.stderr, done.stderr


_RESET_GUEST = b"\xb0\xfe\xe6\x64\xf4"


@pytest.mark.kvm
def test_a_reboot_ends_a_vmm_with_seccomp(tmp_path: Path) -> None:
    guest = tmp_path / "reset.bin"
    guest.write_bytes(_RESET_GUEST)
    args = ["run", "--kernel", str(guest), "--flat-address", "0x100000", "--memory", "64M"]
    done = kvmpy(*args, "--seccomp", timeout=30)
    assert done.returncode == 0 and "with seccomp a reboot ends the VMM" in done.stderr, done.stderr
    assert "guest rebooted" in done.stderr


def test_vfio_ioctls_belong_to_the_roles_that_issue_them() -> None:
    """An assigned device is set up before the machine runs and released when it ends; while it
    runs, only the vCPU thread (the guest's MSI-X or INTx enable) issues a VFIO ioctl."""
    from kvmpy.abi import vfio
    from kvmpy.jail.seccomp_lists import VFIO_RELEASE, VFIO_SETUP, allowed, ioctl_number

    every = {ioctl_number(name) for name in (*VFIO_SETUP, *VFIO_RELEASE)}
    setup, vmm, vcpu = allowed("setup"), allowed("vmm"), allowed("vcpu")
    assert {vfio.VFIO_IOMMU_MAP_DMA, vfio.VFIO_GROUP_GET_DEVICE_FD, vfio.VFIO_DEVICE_GET_INFO} <= setup.ioctls
    assert {vfio.VFIO_DEVICE_RESET, vfio.VFIO_IOMMU_UNMAP_DMA, vfio.VFIO_GROUP_UNSET_CONTAINER} <= vmm.ioctls
    assert vcpu.ioctls & every == {vfio.VFIO_DEVICE_SET_IRQS}
    assert vfio.VFIO_IOMMU_MAP_DMA not in vmm.ioctls  # no new DMA mapping once the VM runs
    for role in ("event-loop", "api", "console"):
        assert not allowed(role).ioctls & every, role


@pytest.mark.kvm
def test_an_assigned_device_under_seccomp_gets_the_ordinary_vfio_error(guests: Path) -> None:
    """VFIO runs under the filters (refused while the exit-time SIGSYS was not found): on this
    host, which has no such device, the set-up role reaches sysfs and says what is missing."""
    done = kvmpy("run", "--seccomp", "--kernel", str(guests / "hello.elf"), "--device", "vfio=0000:00:10.0")
    assert done.returncode == 2, done.stderr
    assert "vfio=0000:00:10.0: no such PCI device" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
