"""A VMM process whose console output is watched: when did a marker (a guest's tick) first appear?

The benchmarks of restore and migration time to "the guest runs": the first
line the guest prints once it runs in the new process. Output is read on a
thread as it comes, each chunk stamped with ``time.perf_counter()``.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from kvmpy.errors import HostError

#: kvmpy as the benchmarks run it: this source tree's code, in a child Python.
SOURCE = Path(__file__).resolve().parents[2]


class WatchedProcess:
    """``argv`` started now; its stdout and stderr collected with arrival times."""

    def __init__(self, argv: Sequence[str], what: str) -> None:
        self.what = what
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=str(SOURCE)),
        )
        self._lock = threading.Condition()
        self._chunks: list[tuple[float, bytes]] = []
        self.stderr = bytearray()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        while chunk := self.process.stdout.read1(65536):  # type: ignore[attr-defined]
            with self._lock:
                self._chunks.append((time.perf_counter(), chunk))
                self._lock.notify_all()
        with self._lock:
            self._chunks.append((time.perf_counter(), b""))  # end of output
            self._lock.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := self.process.stderr.read1(65536):  # type: ignore[attr-defined]
            self.stderr += chunk

    def output(self) -> bytes:
        with self._lock:
            return b"".join(chunk for _, chunk in self._chunks)

    def wait_for(self, marker: bytes, timeout: float, after: int = 0) -> float:
        """perf_counter() time when ``marker`` first appeared past byte ``after`` of the output."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                seen = b""
                for stamp, chunk in self._chunks:
                    seen += chunk
                    if seen.find(marker, after) >= 0:
                        return stamp
                if self._chunks and self._chunks[-1][1] == b"":
                    raise HostError(f"{self.what} ended before printing {marker!r}: {self._tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HostError(
                        f"{self.what} printed no {marker!r} within {timeout:.0f} s: {self._tail()}"
                    )
                self._lock.wait(min(left, 0.5))

    def _tail(self) -> str:
        lines = (bytes(self.stderr) or b"".join(c for _, c in self._chunks)).decode("utf-8", "replace")
        return " | ".join(lines.strip().splitlines()[-3:])

    def stop(self) -> int:
        """Terminate (if still running) and reap; returns the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        for reader in self._readers:
            reader.join(5)
        return self.process.returncode

    def wait(self, timeout: float) -> int:
        """Wait for the process to end by itself; returns its exit status."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise HostError(f"{self.what} did not end within {timeout:.0f} s: {self._tail()}") from None


__all__ = ["SOURCE", "WatchedProcess"]
