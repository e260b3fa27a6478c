"""Measure which system calls each kvmpy thread role makes: the data behind the seccomp allow lists.

Runs kvmpy scenarios under ``strace -f``, tells each thread's role from the
kernel name it gives itself (``prctl(PR_SET_NAME, "kvmpy-vcpu0")`` at the start
of every role, see kvmpy.jail.seccomp.enter_role; a thread is in its creator's
role until then), and prints per role the system calls, the ioctl requests, the
prctl options and the socket families seen. ``--write`` replaces the measured
block of src/kvmpy/jail/seccomp_lists.py with the result.

    PYTHONPATH=src python tools/seccomp_profile.py [--write] [--keep DIR]

The main thread is in the role "setup" until the machine runs (then "vmm").
Scenarios: test guests to their exit code (one and two vCPUs), virtio-blk and
virtio-console guests, the API flow (configure, start, pause, resume, monitor
routes, metrics, snapshot create), a restore from that snapshot, and a live
migration to a second process (both sides traced).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from kvmpy.ctl.client import ApiClient
from kvmpy.testing.guests import build_guests

LISTS_FILE = Path(__file__).resolve().parents[1] / "src" / "kvmpy" / "jail" / "seccomp_lists.py"
BEGIN = "# --- measured: written by tools/seccomp_profile.py --write; do not edit by hand ---\n"
END = "# --- end of the measured lists ---\n"
STRACE = ["strace", "-f", "-qq", "-e", "raw=ioctl", "-s", "48"]

_LINE = re.compile(r"^(\d+) +(?:<\.\.\. (\w+) resumed>(.*)|(\w+)\((.*))$")
_RESULT = re.compile(r"\) += (-?\d+|0x[0-9a-f]+)")
_ROLE_NAMES = {
    "kvmpy-vmm": "vmm",
    "kvmpy-events": "event-loop",
    "kvmpy-api": "api",
    "kvmpy-console": "console",
}


class Profile:
    """Per role: the calls seen, with the ioctl requests, prctl options and socket families."""

    def __init__(self) -> None:
        self.syscalls: dict[str, set[str]] = defaultdict(set)
        self.ioctls: dict[str, set[int]] = defaultdict(set)
        self.prctl: dict[str, set[str]] = defaultdict(set)
        self.sockets: dict[str, set[str]] = defaultdict(set)

    def add(self, role: str, name: str, args: str) -> None:
        self.syscalls[role].add(name)
        first = args.split(",", 1)[0].strip()
        if name == "ioctl":
            request = args.split(",")[1].strip() if "," in args else ""
            if request.startswith("0x"):
                self.ioctls[role].add(int(request, 16))
        elif name == "prctl":
            self.prctl[role].add(first)
        elif name == "socket":
            self.sockets[role].add(first)

    def as_data(self) -> dict[str, dict[str, list[object]]]:
        return {
            role: {
                "syscalls": sorted(self.syscalls[role]),
                "ioctls": sorted(_ioctl_name(n) for n in self.ioctls[role]),
                "prctl": sorted(self.prctl[role]),
                "sockets": sorted(self.sockets[role]),
            }
            for role in sorted(self.syscalls)
        }


def read_trace(path: Path, profile: Profile) -> None:
    """Add one ``strace -f`` output file to ``profile``, each call under the role of its thread."""
    role: dict[int, str] = {}
    pending: dict[int, list[tuple[str, str]]] = defaultdict(list)  # calls of threads not placed yet
    at_call: dict[int, str] = {}  # a thread's role when its unfinished clone started
    begun: dict[int, str] = {}  # the arguments of each thread's unfinished call
    main: int | None = None
    for line in path.read_text(errors="replace").splitlines():
        match = _LINE.match(line)
        if match is None:
            continue
        tid = int(match.group(1))
        if main is None:
            main, role[tid] = tid, "setup"
        name = match.group(2) or match.group(4)
        if match.group(2):  # a call's end: its arguments were on the line that began it
            args = begun.pop(tid, "")
        else:
            args = match.group(5)
            if name in ("clone", "clone3", "fork", "vfork"):
                at_call[tid] = role.get(tid, "?")
            if line.endswith("<unfinished ...>"):
                begun[tid] = args
                continue
        if name == "prctl" and args.startswith("PR_SET_NAME"):
            named = re.search(r'"([^"]*)"', args)
            if named:
                kernel_name = named.group(1)
                new = "vcpu" if kernel_name.startswith("kvmpy-vcpu") else _ROLE_NAMES.get(kernel_name)
                if new is not None:
                    _record(profile, role, pending, tid, name, args)
                    role[tid] = new
                    continue
        _record(profile, role, pending, tid, name, args)
        result = _RESULT.search(line)
        if name in ("clone", "clone3", "fork", "vfork") and result:
            child = int(result.group(1), 0)
            parent_role = at_call.pop(tid, role.get(tid, "?"))
            for call in pending.pop(child, []):
                profile.add(parent_role, *call)
            role.setdefault(child, parent_role)


def _record(
    profile: Profile,
    role: dict[int, str],
    pending: dict[int, list[tuple[str, str]]],
    tid: int,
    name: str,
    args: str,
) -> None:
    if tid in role:
        profile.add(role[tid], name, args)
    else:
        pending[tid].append((name, args))


def _ioctl_name(number: int) -> str:
    names = _known_ioctls()
    return names.get(number, f"{number:#x}")


def _known_ioctls() -> dict[int, str]:
    import termios

    from kvmpy.abi import kvm_generated, tun

    names: dict[int, str] = {}
    for module, prefix in ((tun, "TUN"), (termios, "T"), (termios, "FIO")):
        for name in dir(module):
            value = getattr(module, name)
            if name.startswith(prefix) and isinstance(value, int) and value > 0x100:
                names.setdefault(value, name)
    for name in dir(kvm_generated):  # KVM's ioctls have type 0xAE
        value = getattr(kvm_generated, name)
        if name.startswith("KVM_") and isinstance(value, int) and (value >> 8) & 0xFF == 0xAE:
            names.setdefault(value, name)
    return names


# --- the scenarios ------------------------------------------------------------------------------
def _environment() -> dict[str, str]:
    source = str(Path(__file__).resolve().parents[1] / "src")
    return dict(os.environ, PYTHONPATH=source)


def traced(out: Path, *args: str) -> subprocess.Popen[bytes]:
    """``kvmpy ARGS`` under strace (with ``--check``: with its seccomp filters, and no strace)."""
    if CHECK:
        command = [sys.executable, "-m", "kvmpy", args[0], "--seccomp", *args[1:]]
        out.write_text("")
    else:
        command = [*STRACE, "-o", str(out), sys.executable, "-m", "kvmpy", *args]
    process = subprocess.Popen(
        command, env=_environment(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    PROCESSES.append((out.stem, process))
    return process


#: With --check, the scenarios run with seccomp on and their status and trap lines are reported.
CHECK = False
PROCESSES: list[tuple[str, subprocess.Popen[bytes]]] = []
ERRORS: dict[int, str] = {}


def _finish(process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Wait for a traced kvmpy to end; one that does not is sent SIGTERM (then SIGKILL)."""
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        terminate(process)
        try:
            _, stderr = process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            terminate(process, signal.SIGKILL)
            _, stderr = process.communicate()
    ERRORS[process.pid] = stderr.decode(errors="replace")


def terminate(process: subprocess.Popen[bytes], signum: int = signal.SIGTERM) -> None:
    """Signal kvmpy itself, strace's child (strace only detaches when it gets the signal)."""
    if CHECK:
        process.send_signal(signum)
        return
    children = Path(f"/proc/{process.pid}/task/{process.pid}/children")
    try:
        pids = [int(pid) for pid in children.read_text().split()]
    except (OSError, ValueError):
        pids = []
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _wait(condition: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the scenario did not get there in time")
        time.sleep(0.1)


def scenarios(guests: Path, work: Path) -> Iterator[Path]:
    """Run every scenario under strace; yields the trace files."""
    for name, args in (
        ("hello", ["--kernel", str(guests / "hello.elf"), "--cmdline", "exit=3"]),
        ("hello-2cpus", ["--kernel", str(guests / "hello.elf"), "--cpus", "2", "--stats"]),
        ("pio", ["--kernel", str(guests / "pio_storm.elf"), "--cmdline", "count=2000", "--stats"]),
    ):
        out = work / f"{name}.trace"
        _finish(traced(out, "run", *args))
        yield out
    disk = work / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    out = work / "blk.trace"
    _finish(
        traced(
            out,
            "run",
            "--kernel",
            str(guests / "blk_records.elf"),
            "--cmdline",
            "records=64",
            "--disk",
            f"{disk},id=data",
            "--rng",
            "--serial",
            f"file:{work / 'blk.out'}",
        ),
        timeout=20,
    )
    yield out
    out = work / "console.trace"
    _finish(
        traced(
            out,
            "run",
            "--kernel",
            str(guests / "console_lines.elf"),
            "--cmdline",
            "lines=50",
            "--console",
            "virtio",
        ),
        timeout=20,
    )
    yield out
    yield from _api_flow(guests, work)
    yield from _migration(guests, work)


def _api_flow(guests: Path, work: Path) -> Iterator[Path]:
    sock = work / "api.sock"
    out = work / "api.trace"
    process = traced(out, "run", "--api-sock", str(sock), "--serial", f"file:{work / 'api.out'}")
    _wait(sock.exists)
    api = ApiClient(str(sock))
    api.request(
        "PUT", "/boot-source", {"kernel_image_path": str(guests / "counter.elf"), "boot_args": "gap=20000000"}
    )
    api.request("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})
    api.request("PUT", "/metrics", {"metrics_path": str(work / "metrics.json")})
    api.request("PUT", "/actions", {"action_type": "InstanceStart"})
    time.sleep(1)
    for route in ("vcpus", "stats", "irq", "mtree", "migration"):
        api.get(f"/kvmpy/{route}")
    api.get("/kvmpy/regs", vcpu=0)
    api.request("PATCH", "/vm", {"state": "Paused"})
    api.request("PUT", "/actions", {"action_type": "FlushMetrics"})
    snapshot = work / "snapshot"
    snapshot.mkdir()
    api.request(
        "PUT",
        "/snapshot/create",
        {"snapshot_path": str(snapshot / "state"), "mem_file_path": str(snapshot / "memory")},
    )
    api.request("PATCH", "/vm", {"state": "Resumed"})
    time.sleep(0.5)
    api.request("PUT", "/kvmpy/stop", {"reason": "profile done"})
    _finish(process)
    yield out
    out = work / "restore.trace"
    restored = traced(out, "run", "--restore", str(snapshot), "--serial", "none")
    time.sleep(4)
    terminate(restored)
    _finish(restored)
    yield out


def _migration(guests: Path, work: Path) -> Iterator[Path]:
    incoming = work / "incoming.sock"
    sock = work / "source.sock"
    destination_trace, source_trace = work / "destination.trace", work / "source.trace"
    destination = traced(destination_trace, "run", "--incoming", f"unix:{incoming}", "--serial", "none")
    source = traced(source_trace, "run", "--api-sock", str(sock), "--serial", "none")
    _wait(sock.exists)
    api = ApiClient(str(sock), timeout=120)
    api.request(
        "PUT", "/boot-source", {"kernel_image_path": str(guests / "counter.elf"), "boot_args": "gap=20000000"}
    )
    api.request("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})
    api.request("PUT", "/actions", {"action_type": "InstanceStart"})
    _wait(incoming.exists)
    time.sleep(1)
    api.request("PUT", "/kvmpy/migrate", {"destination": f"unix:{incoming}"})
    _finish(source)
    time.sleep(2)
    terminate(destination)
    _finish(destination)
    yield from (source_trace, destination_trace)


def _write(data: dict[str, dict[str, list[object]]]) -> None:
    text = LISTS_FILE.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    block = "MEASURED: dict[str, dict[str, tuple[str, ...]]] = " + _literal(data) + "\n"
    LISTS_FILE.write_text(text[:start] + block + text[end:])


def _literal(data: dict[str, dict[str, list[object]]]) -> str:
    lines = ["{"]
    for role, parts in data.items():
        lines.append(f"    {role!r}: {{")
        for key, values in parts.items():
            lines.append(f"        {key!r}: (")
            lines.extend(f"            {value!r}," for value in values)
            lines.append("        ),")
        lines.append("    },")
    lines.append("}")
    return "\n".join(lines)


def _check(keep: Path | None) -> int:
    global CHECK
    CHECK = True
    work = keep or Path(tempfile.mkdtemp(prefix="kvmpy-seccomp-check-"))
    work.mkdir(parents=True, exist_ok=True)
    trapped = 0
    for _ in scenarios(build_guests(), work):
        pass
    for name, process in PROCESSES:
        traps = [line for line in ERRORS.get(process.pid, "").splitlines() if "seccomp:" in line]
        trapped += bool(traps) or process.returncode == 148
        print(f"{name}: status {process.returncode}", *traps, sep="\n  ")
    return 1 if trapped else 0


def exit_cost(exits: int = 20000, runs: int = 3) -> dict[str, float]:
    """Microseconds per port-I/O exit round trip without and with the seccomp filters.

    Runs pio_storm (``exits`` OUTs to port 0x80) with ``kvmpy run --stats`` and reads
    the mean exit time it reports; the best of ``runs`` runs each way. Every exit
    passes the vCPU's two filters (the process's and its role's) on KVM_RUN. The
    round trip is the time in KVM_RUN per exit plus the io handler's time per exit.
    """
    guest = build_guests() / "pio_storm.elf"
    result = {}
    for label, extra in (("without", []), ("with", ["--seccomp"])):
        best = float("inf")
        for _ in range(runs):
            args = ["run", *extra, "--kernel", str(guest), "--cmdline", f"count={exits}", "--stats"]
            done = subprocess.run(
                [sys.executable, "-m", "kvmpy", *args], capture_output=True, text=True, env=_environment()
            )
            if done.returncode != 0:
                raise RuntimeError(f"pio_storm {label} seccomp failed: {done.stderr.strip()}")
            best = min(best, _mean_exit_us(done.stderr))
        result[label] = best
    return result


def _mean_exit_us(stats: str) -> float:
    """One exit's round trip from ``--stats``: time in KVM_RUN per exit plus the io handler's time."""
    totals = re.search(r"exits to userspace: (\d+) +time in KVM_RUN: ([\d.]+) s", stats)
    handler = re.search(r"^io +\d+ +[\d.]+ +([\d.]+)$", stats, re.MULTILINE)
    if totals is None or handler is None:
        raise RuntimeError(f"no exit statistics in:\n{stats}")
    return float(totals.group(2)) * 1e6 / int(totals.group(1)) + float(handler.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--write", action="store_true", help=f"rewrite the measured block of {LISTS_FILE.name}"
    )
    parser.add_argument("--keep", type=Path, help="keep the traces in this directory")
    parser.add_argument(
        "--check", action="store_true", help="run the scenarios with --seccomp instead; report traps"
    )
    parser.add_argument(
        "--trace", type=Path, action="append", default=[], help="read these traces, run nothing"
    )
    parser.add_argument("--exit-cost", action="store_true", help="µs per exit without and with seccomp")
    args = parser.parse_args()
    if args.exit_cost:
        cost = exit_cost()
        print(
            f"port-I/O exit round trip: {cost['without']:.1f} µs without seccomp, {cost['with']:.1f} µs with"
        )
        return 0
    profile = Profile()
    if args.check:
        return _check(args.keep)
    if args.trace:
        for path in args.trace:
            read_trace(path, profile)
    else:
        work = args.keep or Path(tempfile.mkdtemp(prefix="kvmpy-seccomp-"))
        work.mkdir(parents=True, exist_ok=True)
        for trace in scenarios(build_guests(), work):
            print(f"traced {trace.name}", file=sys.stderr)
            read_trace(trace, profile)
    data = profile.as_data()
    if args.write:
        _write(data)
    print(json.dumps(data, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
