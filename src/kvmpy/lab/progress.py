"""What the long first-time steps are doing (downloads, image and lab builds), on a terminal.

A fresh machine spends minutes fetching Debian packages and building images before its
first boot; a newcomer should see which step runs and how far a download has come. Shown
only where stderr is a terminal: scripts and tests read kvmpy's stderr for its one-line
errors, and a log has no use for a redrawn bar.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: How often a download's bar looks at the bytes that arrived.
POLL_SECONDS = 0.2


def shown() -> bool:
    return sys.stderr.isatty()


@contextmanager
def step(what: str) -> Iterator[None]:
    """One line when ``what`` starts and one with its time when it is done."""
    if not shown():
        yield
        return
    started = time.monotonic()
    print(f"kvmpy: {what} ...", file=sys.stderr, flush=True)
    yield
    print(f"kvmpy: {what}: done in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)


def package_size(name: str) -> int | None:
    """The .deb's size as the archive lists it (None if apt does not say)."""
    try:
        shown = subprocess.run(
            ["apt-cache", "show", "--no-all-versions", name], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in shown.stdout.splitlines():
        if line.startswith("Size:") and line[5:].strip().isdigit():
            return int(line[5:])
    return None


def _bytes_in(directory: Path) -> int:
    """The files directly in ``directory`` and its ``partial`` directory (where apt-get puts a
    file while it arrives), not the trees unpacked beside them."""
    total = 0
    for folder in (directory, directory / "partial"):
        try:
            total += sum(entry.stat().st_size for entry in folder.iterdir() if entry.is_file())
        except OSError:
            pass
    return total


@contextmanager
def download(label: str, directory: Path, total: int | None) -> Iterator[None]:
    """A bar of the bytes arriving in ``directory`` while the block runs."""
    if not shown():
        yield
        return
    from tqdm import tqdm  # loaded only for a download: it costs tens of ms to import

    before = _bytes_in(directory)
    finished = threading.Event()
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, dynamic_ncols=True, leave=True) as bar:

        def watch() -> None:
            while not finished.wait(POLL_SECONDS):
                bar.n = max(0, _bytes_in(directory) - before)
                bar.refresh()

        watcher = threading.Thread(target=watch, name="download-progress", daemon=True)
        watcher.start()
        try:
            yield
        finally:
            finished.set()
            watcher.join()
            bar.n = max(0, _bytes_in(directory) - before)
            bar.refresh()


__all__ = ["download", "package_size", "shown", "step"]
