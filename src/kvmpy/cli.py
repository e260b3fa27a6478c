"""The ``kvmpy`` command line: turns arguments into a VmConfig and actions.

Every error a user can cause ends in one line on stderr naming the problem,
and a non-zero exit status; ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from kvmpy import __version__
from kvmpy.errors import ConfigError, KvmpyError
from kvmpy.vmm.config import (
    MAX_VCPUS,
    BalloonConfig,
    DiskConfig,
    FsConfig,
    NetConfig,
    OnReboot,
    SerialConfig,
    SerialMode,
    VfioConfig,
    VmConfig,
    parse_size,
)
from kvmpy.vmm.stop import StopKind

if TYPE_CHECKING:
    from kvmpy.vmm.vmm import RunResult, Vmm

#: Exit status for errors of kvmpy itself (as opposed to the guest's own status).
EXIT_USAGE = 2
EXIT_FAILURE = 1


def _int_auto(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _add_run_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    run = subparsers.add_parser("run", help="boot a VM")
    run.add_argument("--kernel", type=Path, help="ELF with a PVH note, bzImage, or flat binary")
    run.add_argument("--initrd", type=Path, help="initial ramdisk")
    run.add_argument("--cmdline", default="", help="kernel command line")
    run.add_argument("--cpus", type=int, default=1, help=f"number of vCPUs (1-{MAX_VCPUS})")
    run.add_argument(
        "--memory",
        default="256M",
        help="guest RAM, e.g. 256M or 2G; SIZE,shared=on: as memfds another process may map"
        " (implied by a vhost-user disk)",
    )
    run.add_argument(
        "--serial",
        default="stdio",
        help="where the console goes: stdio, none, file:PATH, or unix:PATH (a socket kvmpy listens on)",
    )
    run.add_argument("--stats", action="store_true", help="print exit statistics at the end")
    run.add_argument(
        "--on-reboot",
        choices=[mode.value for mode in OnReboot],
        default=OnReboot.RESTART.value,
        help="what a guest reboot does",
    )
    run.add_argument(
        "--flat-address", type=_int_auto, help="load --kernel as a flat 64-bit binary at this address"
    )
    run.add_argument("--hugepages", action="store_true", help="back guest RAM with transparent huge pages")
    run.add_argument(
        "--disk",
        action="append",
        default=[],
        help="virtio-blk disk: PATH[,readonly=on][,direct=on][,id=NAME] (repeatable; direct=on: O_DIRECT);"
        " PATH,backend=vhost-user[,format=raw|qcow2][,aio=io_uring]: served by a qemu-storage-daemon"
        " kvmpy runs; socket=PATH: by the vhost-user daemon listening there",
    )
    run.add_argument("--net", action="append", default=[], help="virtio-net on a tap: tap=IFNAME[,mac=MAC]")
    run.add_argument(
        "--fs",
        action="append",
        default=[],
        help="virtio-fs share served by a virtiofsd kvmpy runs: tag=NAME,path=DIR[,readonly=on] (repeatable;"
        " the guest mounts it with mount -t virtiofs NAME /mnt)",
    )
    run.add_argument("--rng", action="store_true", help="a virtio-rng device fed by the host's getrandom()")
    run.add_argument(
        "--balloon",
        metavar="amount=MIB[,...]",
        help="a virtio-balloon holding MIB of the guest's RAM for the host: amount=MIB"
        "[,deflate_on_oom=on][,stats=SECONDS][,reporting=on]",
    )
    run.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="vfio=BDF",
        help="assign the host PCI device at BDF (DDDD:BB:DD.F, bound to vfio-pci) to the guest"
        " through VFIO; repeatable",
    )
    run.add_argument(
        "--vsock",
        metavar="cid=N",
        help="a virtio-vsock device through the host's vhost-vsock: host processes reach the guest"
        " at AF_VSOCK address (N, PORT)",
    )
    run.add_argument(
        "--console",
        default="serial",
        help="serial: the terminal is the 16550A (ttyS0); virtio: it is virtio-console (hvc0)",
    )
    run.add_argument(
        "--console-rate",
        metavar="SIZE",
        help="console output per second at most (e.g. 64K); the rest is dropped",
    )
    run.add_argument("--api-sock", type=Path, help="serve the Firecracker-compatible API on this Unix socket")
    run.add_argument("--id", default="anonymous-instance", help="the VM's id (GET / reports it)")
    run.add_argument("--config-file", type=Path, help="configure the VM from Firecracker's JSON, then start")
    run.add_argument("--restore", type=Path, metavar="DIR", help="continue the VM snapshotted in DIR")
    run.add_argument(
        "--incoming", metavar="ADDRESS", help="become a VM migrated to tcp:HOST:PORT or unix:PATH"
    )
    run.add_argument("--no-api", action="store_true", help="no API socket (needs --config-file)")
    run.add_argument(
        "--seccomp",
        action="store_true",
        help="load the seccomp filters of each thread's role without the rest of the jail (a guest"
        " reboot ends the VM; a disallowed call ends kvmpy with status 148: docs/security.md)",
    )
    from kvmpy.jail.command import add_run_options

    add_run_options(run)
    run.set_defaults(handler=_run_command)


def _vsock_option(text: str | None) -> int | None:
    """``cid=N``."""
    if text is None:
        return None
    key, _, value = text.partition("=")
    if key != "cid" or not value.isdigit():
        raise ConfigError(f"invalid --vsock {text!r}: use cid=N (3 or more)")
    return int(value)


def _memory_option(text: str) -> tuple[int, bool]:
    """``SIZE[,shared=on|off]``."""
    size, *options = text.split(",")
    shared = False
    for option in options:
        if option not in ("shared=on", "shared=off"):
            raise ConfigError(f"invalid --memory option {option!r}: use shared=on or shared=off")
        shared = option == "shared=on"
    return parse_size(size, what="--memory"), shared


def _device_option(text: str) -> str:
    """``--device vfio=BDF`` -> the canonical PCI address (the only kind of --device so far)."""
    kind, _, value = text.partition("=")
    if kind != "vfio" or not value:
        raise ConfigError(f"invalid --device {text!r}: use vfio=DDDD:BB:DD.F (a host PCI device for VFIO)")
    from kvmpy.vfio.sysfs import parse_bdf

    return parse_bdf(value)


def _config_from_args(args: argparse.Namespace) -> VmConfig:
    memory, shared_memory = _memory_option(args.memory)
    kernel = args.kernel
    given_vm = args.api_sock or args.config_file or args.restore or args.incoming
    if kernel is None and not given_vm:
        kernel = _default_kernel(args)
    return VmConfig(
        kernel=kernel,
        initrd=args.initrd,
        cmdline=args.cmdline,
        cpus=args.cpus,
        memory=memory,
        shared_memory=shared_memory,
        serial=SerialConfig.parse(args.serial),
        on_reboot=OnReboot(args.on_reboot),
        flat_address=args.flat_address,
        hugepages=args.hugepages,
        disks=tuple(DiskConfig.parse(text) for text in args.disk),
        rng=args.rng,
        vsock_cid=_vsock_option(args.vsock),
        vfio_devices=tuple(
            VfioConfig(_device_option(text), id=f"vfio{number}") for number, text in enumerate(args.device)
        ),
        balloon=None if args.balloon is None else BalloonConfig.parse(args.balloon),
        nets=tuple(NetConfig.parse(text) for text in args.net),
        filesystems=tuple(FsConfig.parse(text) for text in args.fs),
        console=args.console,
        console_rate=None
        if args.console_rate is None
        else parse_size(args.console_rate, what="--console-rate"),
    )


def _default_kernel(args: argparse.Namespace) -> Path:
    from kvmpy.vmm.host import kvm_runs_stock_kernels

    if not kvm_runs_stock_kernels():  # the default image's ring-0 code would crawl, then stop
        raise ConfigError(
            "no --kernel given, and this host's KVM has no VT-x/AMD-V (PVM) to boot the default Linux"
            " image: 'kvmpy demo' boots it in the lab, 'kvmpy lab run -- kvmpy run ...' runs any"
            " command there, and --kernel takes a test guest (guests/build/*.elf) here"
        )
    try:
        from kvmpy.lab.image import default_image
    except ImportError:
        raise ConfigError("no --kernel given and no default image support is installed") from None
    kernel, initrd = default_image()
    if args.initrd is None:
        args.initrd = initrd
    if not args.cmdline:
        args.cmdline = "console=ttyS0"
    return Path(kernel)


def run_parsed(args: argparse.Namespace) -> int:
    """Run a command line already parsed by :func:`build_parser` (the jailer's VMM arguments)."""
    status: int = args.handler(args)
    return status


def _run_command(args: argparse.Namespace) -> int:
    if args.jail:
        from kvmpy.jail.command import jail_run

        jail_run(args)  # returns in the jailed process
        if args.jail_probe is not None:
            from kvmpy.jail.command import run_probe

            return run_probe(args.jail_probe)
    if args.no_api and args.api_sock is not None:
        raise ConfigError("--no-api and --api-sock exclude each other")
    if args.no_api and args.config_file is None:
        raise ConfigError("--no-api needs --config-file: without the API nothing could configure the VM")
    takes_whole_vm = args.restore is not None or args.incoming is not None
    if takes_whole_vm and (args.kernel or args.config_file or (args.restore and args.incoming)):
        raise ConfigError("--restore and --incoming take the whole VM: no --kernel or --config-file")
    if args.seccomp:
        from kvmpy.jail import seccomp

        if not seccomp.enabled():  # a jail enables it itself
            seccomp.enable(metrics_flush=METRICS_ON_FAULT)
    if args.api_sock is None and not takes_whole_vm:
        from kvmpy.vmm.runner import run_vm

        if args.config_file is None:
            return _report(args, run_vm(_config_from_args(args)))
    return _report(args, _run_vmm(args))


def _run_vmm(args: argparse.Namespace) -> RunResult:
    """The VMM driven by the API and/or a config file.

    The API socket is bound before anything else is imported or built (clients poll
    for it from the moment they start the process); requests that arrive before the
    VMM exists wait for it.
    """
    server = None
    if args.api_sock is not None:
        from kvmpy.api.server import ApiServer, DeferredSubmit

        deferred = DeferredSubmit()
        server = ApiServer(args.api_sock, deferred)
        server.start()
    try:
        from kvmpy.vmm.actions import StartInstance
        from kvmpy.vmm.runner import stdin_fileno, terminal_mode
        from kvmpy.vmm.vmm import Vmm

        config = _config_from_args(args)
        stdin_fd = stdin_fileno() if config.serial.mode is SerialMode.STDIO else None
        vmm = Vmm(config, vm_id=args.id, stdin_fd=stdin_fd)
        METRICS_ON_FAULT.vmm = vmm
        if server is not None:
            deferred.attach(vmm.submit)
        if args.config_file is not None:
            from kvmpy.api.config_file import load_config_file

            for action in load_config_file(args.config_file):
                vmm.submit(action)
        if args.restore is not None:
            from kvmpy.vmm.actions import LoadSnapshot

            vmm.submit(LoadSnapshot(args.restore / "state", args.restore / "memory", resume_vm=True))
        elif args.incoming is not None:
            from kvmpy.vmm.actions import IncomingMigration

            vmm.submit(IncomingMigration(args.incoming))
        elif args.config_file is not None or args.kernel is not None:
            vmm.submit(StartInstance())
        with terminal_mode(stdin_fd):
            return vmm.run()
    finally:
        if server is not None:
            server.close()


class _MetricsOnFault:
    """Writes the metrics of the Vmm that runs when a seccomp filter traps (it exists only later)."""

    vmm: Vmm | None = None

    def __call__(self) -> None:
        if self.vmm is not None:
            self.vmm.write_metrics_now()


METRICS_ON_FAULT = _MetricsOnFault()


def _report(args: argparse.Namespace, result: RunResult) -> int:
    from kvmpy.vmm.stats_report import format_stats

    reason = result.reason
    if reason.kind in (StopKind.GUEST_ERROR, StopKind.HOST_ERROR):
        print(f"kvmpy: {reason.message}", file=sys.stderr)
        for line in reason.details:
            print(line, file=sys.stderr)
        if result.console_tail:
            print("last console lines:", file=sys.stderr)
            for line in result.console_tail[-10:]:
                print(f"  | {line}", file=sys.stderr)
    elif reason.kind in (StopKind.INTERRUPTED, StopKind.RESET):
        print(f"kvmpy: {reason.message}", file=sys.stderr)
    if args.stats and result.stats is not None:
        print(format_stats(result.stats), file=sys.stderr)
    return reason.status


DEMO_COMMAND = "uname -sr; echo vCPUs: $(nproc); grep MemTotal /proc/meminfo; poweroff -f"


def _add_demo_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    demo = subparsers.add_parser("demo", help="boot the default Linux image (inside the lab if needed)")
    demo.add_argument("--cpus", type=int, default=2)
    demo.add_argument("--memory", default="512M")
    demo.add_argument("--command", default=DEMO_COMMAND, help="shell command the guest runs before poweroff")
    demo.set_defaults(handler=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    """Boot stock Linux: directly where KVM can run it, otherwise inside the lab."""
    from kvmpy.lab.image import build_image, encode_command
    from kvmpy.vmm.host import kvm_runs_stock_kernels

    image = build_image()
    run = [
        sys.executable, "-m", "kvmpy", "run", "--kernel", str(image.kernel), "--initrd", str(image.initrd),
        "--cmdline", f"console=ttyS0 {encode_command(args.command)}",
        "--cpus", str(args.cpus), "--memory", args.memory, "--stats",
    ]  # fmt: skip
    if kvm_runs_stock_kernels():
        return _run_command(build_parser().parse_args(run[3:]))
    from kvmpy.lab.runner import run_in_lab

    print(
        "kvmpy: this host's KVM has no VT-x/AMD-V (PVM) and cannot run stock Linux; "
        "booting it inside the lab (QEMU TCG with AMD SVM, real KVM inside)",
        file=sys.stderr,
    )
    return run_in_lab(run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmpy", description="A virtual machine monitor in Python on Linux KVM."
    )
    parser.add_argument("--version", action="version", version=f"kvmpy {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(subparsers)
    _add_demo_parser(subparsers)
    for optional in (
        "kvmpy.jail.command", "kvmpy.lab.command", "kvmpy.bench.command", "kvmpy.state.command", "kvmpy.ctl",
    ):  # fmt: skip
        try:
            module = importlib.import_module(optional)
        except ImportError:
            continue  # the lab and the benchmarks are optional parts of kvmpy
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="kvmpy: %(message)s",
        stream=sys.stderr,
    )
    try:
        status: int = args.handler(args)
    except ConfigError as error:
        if args.debug:
            raise
        print(f"kvmpy: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KvmpyError as error:
        if args.debug:
            raise
        print(f"kvmpy: error: {error}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("kvmpy: interrupted", file=sys.stderr)
        return 130
    return status


if __name__ == "__main__":
    sys.exit(main())
