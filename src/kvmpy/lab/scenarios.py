"""Guest boot scenarios run inside the lab, many per lab boot.

A lab boot costs seconds of emulation, a Linux boot inside it tens of
seconds; so tests and benchmarks hand this module a list of scenarios,
``run_in_lab`` runs ``python -m kvmpy.lab.scenarios SPEC_JSON`` once, and each
scenario reports facts (exit status, how many times the guest reached its
init, when, the console tail) as one JSON line. Assertions stay with the
caller.

The same scenario can run under kvmpy or under QEMU/KVM (``vmm="qemu"``),
so boot times are measured side by side on the same kernel and initramfs.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmpy.errors import HostError
from kvmpy.lab.direct_scratch import direct_scratch_root
from kvmpy.lab.exit_trace import ExitCounter, ExitTraceError
from kvmpy.lab.image import READY_MARKER, encode_command
from kvmpy.pyspy import leaf_shares, py_spy, record_command

RESULT_PREFIX = "kvmpy-scenario-result "
#: While a VM runs the batch prints a line this often, so the host can tell a busy lab from
#: a hung one (the lab kernel soft-locked under TCG now and then: docs/lab.md).
HEARTBEAT_SECONDS = 30.0
SHELL_TIMEOUT_SECONDS = 300.0
TYPING_PAUSE_SECONDS = 3.0
KILL_GRACE_SECONDS = 60.0
TIMEOUT_MARK = "kvmpy.lab.scenarios: killed after"


@dataclass(frozen=True)
class Scenario:
    name: str
    kernel: str
    initrd: str | None
    command: str  # shell command the guest's init runs (kvmpy.cmd)
    vmm: str = "kvmpy"  # or "qemu" (its pc machine) or "microvm" (QEMU's microvm machine)
    cpus: int = 1
    memory: str = "512M"
    args: tuple[str, ...] = ()
    #: Send SIGINT once the guest has reached its init this many times (0: never).
    interrupt_after_ready: int = 0
    timeout: float = 240.0
    #: Shell commands run in the lab before and after the VM; "{tmp}" in them and in
    #: ``args`` is a writable scratch directory, "{direct}" one on a file system that
    #: supports O_DIRECT (for ``direct=on`` disks). Their output lands in ``notes``.
    prepare: str = ""
    verify: str = ""
    #: Kernel command line before the kvmpy.cmd word.
    kernel_args: str = "console=ttyS0"
    #: Lines typed on the VMM's stdin (the guest console), the first a few seconds after
    #: the guest reached its init, the others two seconds apart.
    typed: tuple[str, ...] = ()
    #: Boot again (up to this many times) after a failure that is the lab's as often as the
    #: VMM's (docs/lab.md): a guest triple fault, a guest that went silent until the timeout,
    #: or one that ended before its init (all three seen under both VMMs). Each retry is
    #: recorded in the result's notes.
    retries: int = 0
    #: Sample kvmpy with py-spy and report the innermost frames (kvmpy only): "boot" from
    #: the start, "workload" from the guest's init on (what its command does).
    profile: str = ""
    #: SIGKILL the VMM a random 0-2 s after the console shows this text (crash-consistency tests);
    #: the seconds waited land in the notes.
    kill_after: str = ""
    #: "api" or "balloon": kvmpy starts with only ``args`` (which name ``--api-sock``) and the API
    #: driver (kvmpy.lab.api_driver, kvmpy.lab.balloon_driver) configures, starts and operates
    #: the VM; its facts land in notes.
    driver: str = ""
    #: Environment variables for the VMM, beside the lab's own.
    env: tuple[tuple[str, str], ...] = ()
    #: How many of the console's last lines the result keeps (a distribution's shutdown alone
    #: prints dozens after the command's own output).
    output_lines: int = 40
    #: Console text that means the VMM failed the guest (a driver's complaint about its device):
    #: lines with any of these, from the whole console, land in the result's ``device_errors``,
    #: and such a boot is never retried, even if it then hangs (a lab failure looks the same).
    device_errors: tuple[str, ...] = ()
    #: Count the VM's returns from KVM_RUN to the VMM, by exit reason, from the lab's kernel
    #: (kvmpy.lab.exit_trace): the same count for every VMM. They land in ``ScenarioResult.exits``.
    count_exits: bool = False


#: At most this many ``device_errors`` lines per result (a broken queue can log one per packet).
DEVICE_ERROR_LINES = 20
API_FACTS_PREFIX = "api-facts "


@dataclass
class ScenarioResult:
    name: str
    status: int | None
    readies: int
    ready_seconds: float | None
    wall_seconds: float
    output: str
    stderr: str = ""
    notes: list[str] = field(default_factory=list)
    #: With ``Scenario.profile``: (innermost frame, share of py-spy samples), largest first.
    profile: list[tuple[str, float]] = field(default_factory=list)
    #: Console lines that matched ``Scenario.device_errors``.
    device_errors: list[str] = field(default_factory=list)
    #: With ``Scenario.count_exits``: the last boot's returns to the VMM, by KVM exit reason.
    exits: dict[str, int] = field(default_factory=dict)


def _kvmpy_command(scenario: Scenario) -> list[str]:
    if scenario.driver:
        return [sys.executable, "-m", "kvmpy", "run", *scenario.args]
    command = [sys.executable, "-m", "kvmpy", "run", "--kernel", scenario.kernel]
    if scenario.initrd:
        command += ["--initrd", scenario.initrd]
    cmdline = f"{scenario.kernel_args} {encode_command(scenario.command)}"
    return [
        *command,
        "--cmdline",
        cmdline,
        "--cpus",
        str(scenario.cpus),
        "--memory",
        scenario.memory,
        *scenario.args,
    ]


#: The VMMs a scenario can name: kvmpy, or QEMU/KVM on its pc machine or on its microvm machine
#: (no PCI, no firmware tables but what the kernel needs: the lightest peer QEMU has).
QEMU_MACHINES = {"qemu": "pc", "microvm": "microvm"}


def _qemu_command(scenario: Scenario) -> list[str]:
    machine = QEMU_MACHINES[scenario.vmm]
    command = ["qemu-system-x86_64", "-enable-kvm", "-M", machine, "-cpu", "host", "-smp", str(scenario.cpus)]
    command += [
        "-m",
        scenario.memory,
        "-display",
        "none",
        "-monitor",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    command += [
        "-kernel",
        scenario.kernel,
        "-append",
        f"{scenario.kernel_args} {encode_command(scenario.command)}",
    ]
    if scenario.initrd:
        command += ["-initrd", scenario.initrd]
    return [*command, *scenario.args]


class _Scratch:
    """The scenario's scratch directories, and "{tmp}"/"{direct}" replaced by them."""

    def __init__(self, scenario: Scenario) -> None:
        self.tmp = tempfile.mkdtemp(prefix=f"{scenario.name}-")
        self.direct = ""
        self.error = ""
        uses_direct = any("{direct}" in text for text in (scenario.prepare, scenario.verify, *scenario.args))
        if uses_direct:
            try:
                self.direct = tempfile.mkdtemp(prefix=f"{scenario.name}-", dir=direct_scratch_root())
            except (HostError, OSError) as error:
                self.error = f"no O_DIRECT scratch space: {error}"
                self.direct = self.tmp

    def fill(self, text: str) -> str:
        return text.replace("{tmp}", self.tmp).replace("{direct}", self.direct)

    def remove(self) -> None:
        for directory in filter(None, (self.tmp, self.direct)):
            shutil.rmtree(directory, ignore_errors=True)


def _shell(command: str, scratch: _Scratch) -> str:
    if not command:
        return ""
    process = subprocess.Popen(
        ["sh", "-c", scratch.fill(command)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    started = time.monotonic()
    while True:
        try:
            output, _ = process.communicate(timeout=HEARTBEAT_SECONDS)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - started > SHELL_TIMEOUT_SECONDS:
                process.kill()
                output, _ = process.communicate()
                break
            print(f"kvmpy-scenario-alive {command[:40]!r} {time.monotonic() - started:.0f} s", flush=True)
    return f"$ {command}\n{output}(exit {process.returncode})"


def run_scenario(scenario: Scenario) -> ScenarioResult:
    scratch = _Scratch(scenario)
    scenario = dataclasses.replace(scenario, args=tuple(scratch.fill(a) for a in scenario.args))
    notes = [scratch.error, _shell(scenario.prepare, scratch)]
    raw_profile = Path(scratch.tmp) / "profile.raw" if scenario.profile and scenario.vmm == "kvmpy" else None
    if raw_profile is not None and py_spy() is None:
        notes.append("py-spy is not installed: no profile")
        raw_profile = None
    result = _run_counted(scenario, raw_profile)
    notes += result.notes
    for _ in range(scenario.retries):
        failure = None if result.device_errors else _lab_failure(result)
        if failure is None:
            break
        last = result.stderr.strip().splitlines()[-1:] or [""]
        notes.append(f"boot {result.wall_seconds:.0f} s ended in {failure} ({last[0][:300]}); booting again")
        print(f"kvmpy-scenario-retry {scenario.name}: {failure}", flush=True)
        result = _run_counted(scenario, raw_profile)
        notes += result.notes
    notes.append(_shell(scenario.verify, scratch))
    result.notes = [note for note in notes if note]
    if raw_profile is not None and raw_profile.exists():
        result.profile = leaf_shares(raw_profile.read_text(), limit=15)
    scratch.remove()
    return result


def _run_counted(scenario: Scenario, raw_profile: Path | None) -> ScenarioResult:
    """One boot, with its exits counted by the lab's kernel if the scenario asks."""
    if not scenario.count_exits:
        return _run_vm(scenario, raw_profile)
    counter = ExitCounter()
    try:
        counter.start()
    except ExitTraceError as error:
        result = _run_vm(scenario, raw_profile)
        result.notes.append(f"exits not counted: {error}")
        return result
    try:
        result = _run_vm(scenario, raw_profile)
    finally:
        counts = counter.stop()
    result.exits = counts
    return result


def _lab_failure(result: ScenarioResult) -> str | None:
    """What went wrong, if it is a failure worth another boot (see ``Scenario.retries``)."""
    if "kvmpy: seccomp:" in result.stderr:  # kvmpy's own filter stopped it: no lab's fault
        return None
    if "guest triple fault" in result.stderr:
        return "a guest triple fault"
    if TIMEOUT_MARK in result.stderr:
        return "a guest silent until the timeout"
    if result.readies == 0:  # QEMU with -no-reboot ends quietly, status 0, on a triple fault
        return f"a guest that never reached its init (status {result.status})"
    return None


def _run_vm(scenario: Scenario, raw_profile: Path | None = None) -> ScenarioResult:
    command = _qemu_command(scenario) if scenario.vmm in QEMU_MACHINES else _kvmpy_command(scenario)
    if scenario.driver:  # a boot before this one (a retry) left its socket: the VMM refuses a used path
        Path(scenario.args[scenario.args.index("--api-sock") + 1]).unlink(missing_ok=True)
    py_spy_path = py_spy() if raw_profile is not None else None
    if py_spy_path is not None and raw_profile is not None and scenario.profile == "boot":
        command = record_command(py_spy_path, raw_profile, command)
    started = time.monotonic()
    process = subprocess.Popen(
        command,
        stdin=subprocess.PIPE if scenario.typed else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **dict(scenario.env)},
    )
    assert process.stdout is not None and process.stderr is not None
    # A guest that hangs silently must not hang the whole batch: a watchdog kills
    # the VMM after the scenario's timeout, and stderr drains on its own thread.
    watchdog = threading.Timer(scenario.timeout, process.kill)
    watchdog.start()
    errors = bytearray()
    error_stream = process.stderr
    drain = threading.Thread(target=lambda: errors.extend(error_stream.read()), daemon=True)
    drain.start()
    watch = _ConsoleWatch(scenario, process, started, py_spy_path, raw_profile)
    reader = threading.Thread(target=watch.follow, daemon=True)
    reader.start()
    driver_facts: list[str] = []
    if scenario.driver:
        threading.Thread(target=_drive_api, args=(scenario, watch, driver_facts), daemon=True).start()
    # A VMM stuck in the kernel survives SIGKILL and keeps its pipes open: give up on it
    # a minute after the watchdog fired rather than wait for its EOF for ever.
    give_up = started + scenario.timeout + KILL_GRACE_SECONDS
    while reader.is_alive() and time.monotonic() < give_up:
        reader.join(min(HEARTBEAT_SECONDS, max(0.0, give_up - time.monotonic())))
        if reader.is_alive():
            print(f"kvmpy-scenario-alive {scenario.name} {time.monotonic() - started:.0f} s", flush=True)
    status: int | None = None
    try:
        if not reader.is_alive():
            status = process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
    finally:
        watchdog.cancel()
    readies, ready_at, sampler, output = watch.readies, watch.ready_at, watch.sampler, watch.output
    if watch.killed_at is not None:
        driver_facts.append(f"killed with SIGKILL {watch.killed_at:.1f} s after the start")
    if reader.is_alive():
        errors += b"\nkvmpy.lab.scenarios: the VMM outlived SIGKILL (stuck in the kernel); abandoned"
    drain.join(timeout=10)
    if sampler is not None:
        try:
            sampler.wait(timeout=30)  # py-spy writes its file once the VMM is gone
        except subprocess.TimeoutExpired:
            sampler.kill()
    timed_out = time.monotonic() - started >= scenario.timeout
    stderr = errors.decode("utf-8", "replace")
    if timed_out:
        stderr += f"\n{TIMEOUT_MARK} {scenario.timeout:.0f} s"
    text = output.decode("utf-8", "replace")
    return ScenarioResult(
        name=scenario.name,
        status=status,
        readies=readies,
        ready_seconds=ready_at,
        wall_seconds=time.monotonic() - started,
        output="\n".join(text.splitlines()[-scenario.output_lines :]),
        stderr="\n".join(stderr.splitlines()[-60:]),
        notes=driver_facts,
        device_errors=_matching_lines(text, scenario.device_errors),
    )


def _matching_lines(text: str, patterns: tuple[str, ...]) -> list[str]:
    if not patterns:
        return []
    matches = (line for line in text.splitlines() if any(pattern in line for pattern in patterns))
    return list(itertools.islice(matches, DEVICE_ERROR_LINES))


def _drive_api(scenario: Scenario, watch: _ConsoleWatch, facts_out: list[str]) -> None:
    """Operate the VM through its API socket (a lab thread beside the VMM); facts to ``facts_out``."""
    from kvmpy.lab.api_driver import ApiDriver
    from kvmpy.lab.balloon_driver import BalloonDriver

    socket_path = scenario.args[scenario.args.index("--api-sock") + 1]
    kind = {"api": ApiDriver, "balloon": BalloonDriver}[scenario.driver]
    driver = kind(socket_path, lambda: watch.output.decode("utf-8", "replace"))
    cmdline = f"{scenario.kernel_args} {encode_command(scenario.command)}"
    try:
        memory_mib = int(scenario.memory.rstrip("M"))
        driver.drive(scenario.kernel, scenario.initrd, cmdline, scenario.cpus, memory_mib)
    except Exception as error:  # the facts so far, and what stopped the driver
        driver.facts["error"] = f"{type(error).__name__}: {error}"
    facts_out.append(API_FACTS_PREFIX + json.dumps(driver.facts))


class _ConsoleWatch:
    """Follows the VMM's console: counts the guest's readiness markers and acts on the first."""

    def __init__(
        self,
        scenario: Scenario,
        process: subprocess.Popen[bytes],
        started: float,
        py_spy_path: str | None,
        raw_profile: Path | None,
    ) -> None:
        self.scenario, self.process, self.started = scenario, process, started
        self.py_spy_path, self.raw_profile = py_spy_path, raw_profile
        self.output = bytearray()
        self.readies = 0
        self.ready_at: float | None = None
        self.sampler: subprocess.Popen[bytes] | None = None
        self.killer: threading.Timer | None = None
        #: When the VMM was killed (``Scenario.kill_after``), seconds after its start.
        self.killed_at: float | None = None

    def _kill(self) -> None:
        self.killed_at = time.monotonic() - self.started
        self.process.kill()

    def follow(self) -> None:
        assert self.process.stdout is not None
        marker = READY_MARKER.encode()
        kill_mark = self.scenario.kill_after.encode()
        for line in iter(self.process.stdout.readline, b""):
            self.output += line
            if kill_mark and kill_mark in line and self.killer is None:
                self.killer = threading.Timer(random.uniform(0.0, 2.0), self._kill)
                self.killer.start()
            if marker in line:
                self.readies += 1
                self.ready_at = self.ready_at or time.monotonic() - self.started
                self._on_ready()

    def _on_ready(self) -> None:
        scenario, process = self.scenario, self.process
        if self.readies == 1 and self.py_spy_path and self.raw_profile and scenario.profile == "workload":
            self.sampler = _attach_sampler(self.py_spy_path, self.raw_profile, process.pid)
        if scenario.typed and self.readies == 1:
            threading.Thread(target=_type, args=(process, scenario.typed), daemon=True).start()
        if scenario.interrupt_after_ready and self.readies >= scenario.interrupt_after_ready:
            process.send_signal(signal.SIGINT)


def _attach_sampler(py_spy_path: str, raw_profile: Path, pid: int) -> subprocess.Popen[bytes]:
    """py-spy attached to the running VMM until it exits (sampling without stopping it)."""
    command = record_command(py_spy_path, raw_profile, pid=pid)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _type(process: subprocess.Popen[bytes], lines: tuple[str, ...]) -> None:
    """Type ``lines`` at the guest's console once its shell has had time to start."""
    assert process.stdin is not None
    try:
        for line in lines:
            time.sleep(TYPING_PAUSE_SECONDS)
            process.stdin.write(line.encode() + b"\n")
            process.stdin.flush()
    except OSError:
        pass  # the VMM is gone; the result says why


def parse_results(text: str) -> dict[str, ScenarioResult]:
    """Results printed by :func:`main`, from the lab's output."""
    results = {}
    for line in text.splitlines():
        if line.startswith(RESULT_PREFIX):
            data = json.loads(line[len(RESULT_PREFIX) :])
            data["profile"] = [(frame, share) for frame, share in data.get("profile", [])]
            results[data["name"]] = ScenarioResult(**data)
    return results


def main(argv: list[str]) -> int:
    specs = json.loads(Path(argv[0]).read_text() if argv[0].endswith(".json") else argv[0])
    for spec in specs:
        spec["args"] = tuple(spec.get("args", ()))
        spec["typed"] = tuple(spec.get("typed", ()))
        print(f"kvmpy-scenario-start {spec['name']}", flush=True)  # shows which one a stalled lab was on
        result = run_scenario(Scenario(**spec))
        print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
