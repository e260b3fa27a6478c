"""A kvmpy VMM driven through its actions, in a child process, for the snapshot and migration benchmarks.

``python -m kvmpy.bench.vmm_driver snapshot|load|migrate ...`` prints one JSON line.

- ``snapshot``: boot a guest, wait for its ticks, Pause, then CreateSnapshot (timed), stop.
- ``load``: in a fresh VMM, LoadSnapshot with resume (timed: the call alone, as Firecracker
  measures its load), then the time until the guest's first tick; with ``--warm``, the
  modules the restore needs are imported before the call.
- ``migrate``: boot a guest, wait for its ticks, then Migrate to a destination (``kvmpy run
  --incoming``) and print the sender's report.

There is no API route or ``kvmpy ctl`` command for CreateSnapshot or Migrate yet, so the
benchmark submits the actions to a Vmm the way the tests do; the timings are of those
actions in a process that starts as ``kvmpy run`` does.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when the action runs, as kvmpy run does
    from kvmpy.vmm.vmm import Vmm

TICK = b"tick "


class TickConsole:
    """The guest's serial output; an event for its n-th tick, stamped with perf_counter()."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._data = bytearray()
        self._changed = threading.Condition(self._lock)
        self.first_tick: float | None = None

    def write(self, data: bytes) -> int:
        with self._changed:
            self._data += data
            if self.first_tick is None and TICK in self._data:
                self.first_tick = time.perf_counter()
            self._changed.notify_all()
        return len(data)

    def flush(self) -> None:
        pass

    def wait_ticks(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._data.count(TICK) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"the guest printed {self._data.count(TICK)} of {count} ticks")
                self._changed.wait(left)


def _serve(vmm: Vmm, client: threading.Thread) -> None:
    """Run the VMM on this thread while ``client`` drives it."""
    client.start()
    vmm.run()
    client.join(60)


def _booted(args: argparse.Namespace, console: TickConsole) -> Vmm:
    from kvmpy.vmm import actions as a
    from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
    from kvmpy.vmm.vmm import Vmm

    config = VmConfig(
        kernel=args.kernel,
        cmdline=args.cmdline,
        memory=args.memory_mib << 20,
        cpus=1,
        serial=SerialConfig(SerialMode.NONE),
    )
    vmm = Vmm(config, serial_sink=console)
    vmm.submit(a.StartInstance())
    return vmm


def snapshot(args: argparse.Namespace) -> dict[str, object]:
    from kvmpy.vmm import actions as a

    console = TickConsole()
    vmm = _booted(args, console)
    result: dict[str, object] = {}

    def client() -> None:
        try:
            console.wait_ticks(args.ticks)
            began = time.perf_counter()
            vmm.submit(a.Pause())
            paused = time.perf_counter()
            vmm.submit(a.CreateSnapshot(args.out / "state", args.out / "memory"))
            result["pause_seconds"] = paused - began
            result["create_seconds"] = time.perf_counter() - paused
        except BaseException as error:
            result["error"] = str(error)
        finally:
            vmm.submit(a.Stop("snapshot taken"))

    _serve(vmm, threading.Thread(target=client))
    return result


def load(args: argparse.Namespace) -> dict[str, object]:
    from kvmpy.vmm import actions as a
    from kvmpy.vmm.config import SerialConfig, SerialMode, VmConfig
    from kvmpy.vmm.vmm import Vmm

    if args.warm:  # what a VMM could import while it waits for the call: the rest is the load itself
        import kvmpy.memory.guest_memory
        import kvmpy.state.machine_state
        import kvmpy.state.snapshot_file
        import kvmpy.vmm.machine  # noqa: F401

    console = TickConsole()
    vmm = Vmm(VmConfig(serial=SerialConfig(SerialMode.NONE)), serial_sink=console)
    began = time.perf_counter()
    vmm.submit(a.LoadSnapshot(args.out / "state", args.out / "memory", resume_vm=True))
    loaded = time.perf_counter()
    result: dict[str, object] = {"load_seconds": loaded - began}

    def client() -> None:
        try:
            console.wait_ticks(1, timeout=30)
            assert console.first_tick is not None
            result["first_tick_seconds"] = console.first_tick - loaded
        except BaseException as error:
            result["error"] = str(error)
        finally:
            vmm.submit(a.Stop("restored"))

    _serve(vmm, threading.Thread(target=client))
    return result


def migrate(args: argparse.Namespace) -> dict[str, object]:
    from kvmpy.vmm import actions as a

    console = TickConsole()
    vmm = _booted(args, console)
    result: dict[str, object] = {}

    def client() -> None:
        try:
            console.wait_ticks(args.ticks)
            report = vmm.submit(a.Migrate(args.to, downtime_ms=args.downtime_ms))
            assert isinstance(report, dict)
            result.update(report)
        except BaseException as error:
            result["error"] = str(error)
            vmm.submit(a.Stop("migration failed"))

    _serve(vmm, threading.Thread(target=client))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvmpy.bench.vmm_driver")
    parser.add_argument("what", choices=("snapshot", "load", "migrate"))
    parser.add_argument("--kernel", type=Path)
    parser.add_argument("--cmdline", default="")
    parser.add_argument("--memory-mib", type=int, default=256)
    parser.add_argument("--ticks", type=int, default=3, help="ticks to wait for before acting")
    parser.add_argument("--out", type=Path, help="the snapshot's directory (state, memory)")
    parser.add_argument("--to", help="the migration's destination (unix:PATH)")
    parser.add_argument("--downtime-ms", type=int, default=300)
    parser.add_argument("--warm", action="store_true", help="load: import the restore's modules first")
    args = parser.parse_args(argv)
    result = {"snapshot": snapshot, "load": load, "migrate": migrate}[args.what](args)
    print(json.dumps(result))
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
