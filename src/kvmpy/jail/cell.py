"""Enter the jail: the steps, in the order that makes each possible.

Everything that needs the host's file system or root's privileges happens
first (imports, the cgroup, the network namespace's handle, the host's device
numbers, the bind mounts), then the process closes in: pivot into the root,
make the device nodes, join the network namespace, new PID/IPC/UTS namespaces,
resource limits, unprivileged ids, ``no_new_privs``, Landlock, and last the
seccomp filters (each thread adds its role's when it starts). The function
returns in the process that goes on to run the VMM: with ``--new-pid-ns`` or
``--daemonize`` that is a child, and the parent exits here.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from collections.abc import Callable
from pathlib import Path

from kvmpy.errors import ConfigError, HostError
from kvmpy.jail import cgroups, chroot, libc
from kvmpy.jail.landlock_rules import restrict
from kvmpy.jail.options import RESOURCE_LIMITS, JailOptions
from kvmpy.jail.preload import preload

log = logging.getLogger("kvmpy.jail")


def _close_other_fds(keep: set[int]) -> None:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for fd in os.listdir("/proc/self/fd"):
        number = int(fd)
        if number > 2 and number not in keep and number < limit:
            try:
                os.close(number)
            except OSError:
                pass  # the directory's own descriptor, closed by listdir already


def _open_netns(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise ConfigError(f"cannot open the network namespace {path}: {error.strerror}") from None


def _set_limits(options: JailOptions) -> None:
    for name, value in options.limits().items():
        try:
            resource.setrlimit(RESOURCE_LIMITS[name], (value, value))
        except (OSError, ValueError) as error:
            raise ConfigError(f"cannot set the {name} limit to {value}: {error}") from None


def _write_pid_file(options: JailOptions, pid: int) -> None:
    """Firecracker's jailer leaves the VMM's pid in ``<root>/<exec-name>.pid``."""
    with open(f"/{options.exec_name}.pid", "w") as handle:
        handle.write(str(pid))


def _fork_child(options: JailOptions, wait: bool) -> None:
    """Go on in a child; the parent records the child's pid and exits, or with ``wait`` waits
    for the child and exits with its status (a jailed ``kvmpy run`` in the foreground)."""
    child = os.fork()
    if not child:
        return
    _write_pid_file(options, child)
    if not wait:
        os._exit(0)
    _pid, status = os.waitpid(child, 0)
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


def _daemonize(devnull: int) -> None:
    os.setsid()
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _become_the_vmm_process(options: JailOptions, devnull: int | None, wait: bool) -> None:
    """PID 1 of the new PID namespace (a fork), a session of its own with ``--daemonize`` (a
    fork too if this process leads its group, which setsid() refuses), and the pid file."""
    forked = False
    if options.new_pid_ns:
        _fork_child(options, wait)
        forked = True
    if devnull is not None:
        if os.getpgrp() == os.getpid():
            _fork_child(options, wait=False)
            forked = True
        _daemonize(devnull)
    if not forked:
        _write_pid_file(options, os.getpid())


def _drop_privileges(uid: int, gid: int) -> None:
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    libc.prctl(libc.PR_SET_NO_NEW_PRIVS, 1)


def enter(
    options: JailOptions,
    binds: tuple[chroot.Bind, ...] = (),
    *,
    wait: bool = False,
    metrics_flush: Callable[[], None] | None = None,
) -> None:
    """Jail this process; must run before kvmpy starts any thread of its own.

    ``wait``: with a new PID namespace, the parent waits for the VMM and exits with its
    status instead of at once (Firecracker's jailer exits at once). ``metrics_flush`` writes the
    metrics when a seccomp filter traps a call, before the VMM ends."""
    started = time.monotonic()
    preload()
    _close_other_fds(keep=set())
    os.environ.clear()
    chroot.make_root(options.root)
    joined = tuple(
        cgroups.join(options.cgroup_version, options.cgroups, Path(options.cgroup_parent) / options.id,
                     os.getpid())
    )  # fmt: skip
    netns = _open_netns(options.netns)
    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC) if options.daemonize else None
    devices = chroot.host_devices()
    namespaces = libc.CLONE_NEWNS | libc.CLONE_NEWIPC | libc.CLONE_NEWUTS
    if options.new_pid_ns:
        namespaces |= libc.CLONE_NEWPID
    try:
        if netns is not None:
            libc.setns(netns, libc.CLONE_NEWNET)
            os.close(netns)
        libc.unshare(namespaces)
        socket.sethostname(options.id)
        chroot.pivot_into(options.root, binds)
        os.makedirs("/dev", exist_ok=True)
        chroot.make_devices(devices, options.uid, options.gid)
        os.chown("/", options.uid, options.gid)
    except OSError as error:
        raise HostError(f"cannot build the jail at {options.root}: {error}") from None
    _set_limits(options)
    _become_the_vmm_process(options, devnull, wait)
    _drop_privileges(options.uid, options.gid)
    landlock_abi = restrict("/")
    if options.seccomp:
        from kvmpy.jail import seccomp

        seccomp.enable(metrics_flush)
    log.debug(
        "jailed in %s as pid %d in %.0f ms: cgroups %s, Landlock ABI %d, seccomp %s",
        options.root, os.getpid(), (time.monotonic() - started) * 1000,
        [str(path) for path in joined], landlock_abi, "on" if options.seccomp else "off",
    )  # fmt: skip
