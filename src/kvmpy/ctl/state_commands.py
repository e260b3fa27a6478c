"""``kvmpy ctl SOCKET snapshot DIR`` and ``kvmpy ctl SOCKET migrate ADDRESS``: a VM's state, moved.

Both are clients of the API like the rest of ``kvmpy ctl``. ``snapshot`` pauses
a running VM, takes the snapshot (Firecracker's PUT /snapshot/create) and
resumes it. ``migrate`` starts the migration (PUT /kvmpy/migrate), which holds
the VMM until it is over, and meanwhile polls GET /kvmpy/migration, which the
VMM answers at once, for a progress bar.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmpy.errors import HostError

if TYPE_CHECKING:
    from kvmpy.ctl.client import ApiClient

#: How often the progress bar asks how the migration is going.
POLL_SECONDS = 0.2


def snapshot(client: ApiClient, directory: Path, diff: bool) -> dict[str, Any]:
    """Snapshot the VM into ``directory`` (state and memory), pausing it only for the snapshot.

    The paths are the VMM's: a jailed VMM writes inside its jail, where ``directory`` must
    exist already and where this client cannot see the files (their sizes are then unknown)."""
    directory.mkdir(parents=True, exist_ok=True)
    was_running = client.request("GET", "/")["state"] == "Running"
    if was_running:
        client.request("PATCH", "/vm", {"state": "Paused"})
    started = time.monotonic()
    try:
        client.request(
            "PUT",
            "/snapshot/create",
            {
                "snapshot_path": str(directory / "state"),
                "mem_file_path": str(directory / "memory"),
                "snapshot_type": "Diff" if diff else "Full",
            },
        )
    finally:
        if was_running:
            client.request("PATCH", "/vm", {"state": "Resumed"})
    answer: dict[str, Any] = {
        "directory": str(directory),
        "type": "Diff" if diff else "Full",
        "seconds": time.monotonic() - started,
        "resumed": was_running,
    }
    try:
        memory = (directory / "memory").stat()
        answer.update(
            state_bytes=(directory / "state").stat().st_size,
            memory_bytes=memory.st_size,
            memory_bytes_on_disk=memory.st_blocks * 512,
        )
    except FileNotFoundError:  # written where the VMM sees it, not here (a jail)
        pass
    return answer


def format_snapshot(answer: dict[str, Any]) -> str:
    if "state_bytes" in answer:
        files = (
            f"state {answer['state_bytes']} bytes, memory {answer['memory_bytes'] >> 20} MiB "
            f"({answer['memory_bytes_on_disk'] >> 10} KiB on disk)"
        )
    else:
        files = "the files are where the VMM sees them (its jail), not here"
    return (
        f"{answer['type']} snapshot in {answer['directory']} in {answer['seconds'] * 1000:.0f} ms: {files}"
        + ("; the VM runs again" if answer["resumed"] else "")
    )


def migrate(
    client: ApiClient, poller: ApiClient, body: dict[str, Any], show_progress: bool
) -> dict[str, Any]:
    """Run the migration; while it runs, a progress bar from the VMM's migration status."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["report"] = client.request("PUT", "/kvmpy/migrate", body)
        except Exception as error:  # shown on the caller's thread
            outcome["error"] = error

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    if show_progress:
        _progress(worker, poller)
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    report: dict[str, Any] = outcome["report"]
    return report


def _progress(worker: threading.Thread, poller: ApiClient) -> None:
    from tqdm import tqdm  # loaded only for a migration: it costs tens of ms to import

    with tqdm(unit="page", unit_scale=True, desc="round 0", dynamic_ncols=True) as bar:
        while worker.is_alive():
            worker.join(POLL_SECONDS)
            try:
                status = poller.get("/kvmpy/migration")
            except HostError:
                continue
            if status.get("state") != "active" or "guest_pages" not in status:
                continue
            bar.total = status["guest_pages"]
            bar.n = min(status["pages_sent"], bar.total)
            bar.set_description(f"round {status['round']}")
            rate = status["bytes_sent"] / max(status["seconds"], 1e-3) / (1 << 20)
            bar.set_postfix_str(f"{status['bytes_sent'] >> 20} MiB sent, {rate:.0f} MiB/s")


def format_migration(report: dict[str, Any]) -> str:
    downtime = report.get("downtime_seconds")
    shown = f"{downtime * 1000:.0f} ms" if downtime is not None else "unknown"
    lines = [
        f"migrated to {report['destination']} in {report['total_seconds']:.2f} s: "
        f"{report['rounds']} rounds, {report['bytes_sent'] >> 20} MiB sent, downtime {shown}",
        "pages per round: " + ", ".join(str(p) for p in report["round_pages"]),
    ]
    if report.get("note"):
        lines.append(str(report["note"]))
    return "\n".join(lines)


def register(command: Any) -> None:
    """Add the two commands with ``command(name, handler, help)`` from ctl's register."""
    snap = command("snapshot", _snapshot, "pause, snapshot into DIR (state and memory), resume")
    snap.add_argument("directory", type=Path, metavar="DIR")
    snap.add_argument("--diff", action="store_true", help="only the pages written since the last snapshot")
    move = command("migrate", _migrate, "move the running VM to kvmpy run --incoming ADDRESS")
    move.add_argument("destination", metavar="ADDRESS", help="tcp:HOST:PORT or unix:PATH")
    move.add_argument("--downtime-ms", type=int, default=300, help="longest pause the guest may see")
    move.add_argument("--max-rounds", type=int, default=30, help="dirty-page rounds before giving in")
    move.add_argument("--cancel-on-limit", action="store_true", help="give up instead of pausing longer")
    move.add_argument("--no-progress", action="store_true", help="no progress bar")


def _snapshot(args: argparse.Namespace) -> int:
    from kvmpy.ctl import _client, _print

    return _print(args, snapshot(_client(args), args.directory, args.diff), format_snapshot)


def _migrate(args: argparse.Namespace) -> int:
    from kvmpy.ctl import _client, _print

    body = {
        "destination": args.destination,
        "downtime_ms": args.downtime_ms,
        "max_rounds": args.max_rounds,
        "on_limit": "cancel" if args.cancel_on_limit else "pause",
    }
    client = _client(args)
    client.timeout = max(client.timeout, 3600.0)  # the answer comes when the migration is over
    report = migrate(client, _client(args), body, show_progress=not args.no_progress and not args.json)
    return _print(args, report, format_migration)


__all__ = ["format_migration", "format_snapshot", "migrate", "register", "snapshot"]
