"""``kvmpy jailer`` (Firecracker's jailer's command line) and ``kvmpy run --jail``.

``kvmpy jailer --id ID --exec-file PATH --uid U --gid G [...] -- RUN-ARGS`` jails this
process as Firecracker's jailer jails Firecracker, then runs ``kvmpy run RUN-ARGS --id ID``
in it: every path in RUN-ARGS and in API requests is inside the jail's root, where the
caller put (hard-linked, copied) the files, as Firecracker's users do.

``kvmpy run --jail ...`` is the same jail for a VM started by hand: the files named on its
command line are bind-mounted into the root one by one, and sockets it creates there (the
API's, a console's) are reached from the host through a symlink at the path given.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpy.errors import ConfigError

if TYPE_CHECKING:  # the jail's modules load when a jail is built: `kvmpy run` starts fast without
    from kvmpy.jail.options import JailOptions

#: The uid and gid of ``kvmpy run --jail`` unless given: nobody and nogroup.
NOBODY = 65534
#: Firecracker's jailer's default base directory.
DEFAULT_CHROOT_BASE = Path("/srv/jailer")


def _add_jail_options(parser: argparse._ActionsContainer) -> None:
    parser.add_argument("--chroot-base-dir", type=Path, default=DEFAULT_CHROOT_BASE)
    parser.add_argument("--netns", type=Path, help="join this network namespace (e.g. /var/run/netns/NAME)")
    parser.add_argument("--cgroup-version", type=int, choices=(1, 2), default=1)
    parser.add_argument("--cgroup", action="append", default=[], help="FILE=VALUE, e.g. cpuset.cpus=0")
    parser.add_argument("--parent-cgroup", help="relative parent of the cgroup (default: exec file name)")
    parser.add_argument("--resource-limit", action="append", default=[], help="fsize=N or no-file=N")
    parser.add_argument("--new-pid-ns", action="store_true", help="the VMM is PID 1 of a new PID namespace")
    parser.add_argument("--no-seccomp", action="store_true", help="no seccomp filters (for debugging)")
    # Tests: Python code run in the jailed process instead of the VMM (escape attempts).
    parser.add_argument("--jail-probe", help=argparse.SUPPRESS)


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    jailer = subparsers.add_parser(
        "jailer",
        help="jail this process (Firecracker jailer options), then `kvmpy run` the arguments after --",
    )
    jailer.add_argument("--id", required=True, help="the VM's id: letters, digits, hyphens")
    jailer.add_argument("--exec-file", type=Path, required=True, help="the kvmpy executable (names the jail)")
    jailer.add_argument("--uid", type=int, required=True)
    jailer.add_argument("--gid", type=int, required=True)
    jailer.add_argument("--daemonize", action="store_true", help="setsid() and standard I/O to /dev/null")
    _add_jail_options(jailer)
    jailer.add_argument("vmm_args", nargs=argparse.REMAINDER, help="-- then the arguments of `kvmpy run`")
    jailer.set_defaults(handler=_jailer_command)


def add_run_options(run: argparse.ArgumentParser) -> None:
    """``kvmpy run --jail`` and the jail's options (the same names as the jailer's)."""
    group = run.add_argument_group("jail (docs/security.md)")
    group.add_argument("--jail", action="store_true", help="run this VMM in a jail")
    group.add_argument("--jail-uid", type=int, default=NOBODY, help="the VMM's uid in the jail")
    group.add_argument("--jail-gid", type=int, default=NOBODY, help="the VMM's gid in the jail")
    _add_jail_options(group)


def options_from(args: argparse.Namespace, *, vm_id: str, exec_file: Path, uid: int, gid: int,
                 daemonize: bool, name: str | None = None) -> JailOptions:  # fmt: skip
    from kvmpy.jail.options import (
        JailOptions,
        check_id,
        parse_cgroup,
        parse_parent_cgroup,
        parse_resource_limit,
    )

    if not exec_file.is_file():
        raise ConfigError(f"--exec-file {exec_file}: no such file")
    if args.chroot_base_dir is not None and not args.chroot_base_dir.is_absolute():
        raise ConfigError(f"--chroot-base-dir {args.chroot_base_dir}: must be an absolute path")
    if os.geteuid() != 0:
        raise ConfigError("the jail is built as root (namespaces, cgroups, mknod), then drops to --uid/--gid")
    return JailOptions(
        id=check_id(vm_id),
        exec_file=exec_file,
        uid=uid,
        gid=gid,
        chroot_base=args.chroot_base_dir,
        netns=args.netns,
        cgroup_version=args.cgroup_version,
        cgroups=tuple(parse_cgroup(text) for text in args.cgroup),
        parent_cgroup=None if args.parent_cgroup is None else parse_parent_cgroup(args.parent_cgroup),
        resource_limits=dict(parse_resource_limit(text) for text in args.resource_limit),
        daemonize=daemonize,
        new_pid_ns=args.new_pid_ns,
        seccomp=not args.no_seccomp,
        name=name,
    )


def _jailer_command(args: argparse.Namespace) -> int:
    from kvmpy.cli import METRICS_ON_FAULT, build_parser, run_parsed
    from kvmpy.jail.cell import enter

    vmm_args = list(args.vmm_args)
    if vmm_args and vmm_args[0] == "--":
        vmm_args = vmm_args[1:]
    options = options_from(
        args, vm_id=args.id, exec_file=args.exec_file, uid=args.uid, gid=args.gid, daemonize=args.daemonize
    )
    run_args = build_parser().parse_args(["run", *vmm_args, "--id", options.id])
    if run_args.jail:
        raise ConfigError("the arguments after -- are those of `kvmpy run` without --jail")
    enter(options, metrics_flush=METRICS_ON_FAULT)
    if args.jail_probe is not None:
        return run_probe(args.jail_probe)
    return run_parsed(run_args)


def run_probe(code: str) -> int:
    """Run a test's escape attempts in the jailed process (they print what happened)."""
    exec(compile(code, "<jail-probe>", "exec"), {"__name__": "__jail_probe__"})
    sys.stdout.flush()
    return 0


def jail_run(args: argparse.Namespace) -> None:
    """``kvmpy run --jail``: bind what the arguments name into the jail, rewrite them to the
    paths inside, and enter it (returns in the jailed process)."""
    from kvmpy.cli import METRICS_ON_FAULT
    from kvmpy.jail.cell import enter
    from kvmpy.jail.run_binds import bind_run_files

    if getattr(args, "device", None):
        raise ConfigError(
            "--device vfio= cannot run under --jail yet: the jail binds neither /dev/vfio nor the"
            " device's sysfs (--seccomp alone works; docs/security.md)"
        )
    options = options_from(
        args, vm_id=args.id, exec_file=Path(sys.executable), uid=args.jail_uid, gid=args.jail_gid,
        daemonize=False, name="kvmpy",
    )  # fmt: skip
    binds = bind_run_files(args, options.root, options.uid, options.gid)
    enter(options, binds, wait=True, metrics_flush=METRICS_ON_FAULT)
