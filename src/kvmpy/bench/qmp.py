"""A small QMP client: QEMU's JSON monitor on a Unix socket, for the peer runs of the benchmarks.

QMP is line-delimited JSON: a greeting, ``qmp_capabilities``, then commands
answered by ``{"return": ...}`` or ``{"error": ...}``, with asynchronous
``{"event": ...}`` messages in between, which are kept for :meth:`wait_event`.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

from kvmpy.errors import HostError


class QmpError(HostError):
    """QEMU refused a command, closed the socket, or did not answer in time."""


class Qmp:
    """One QMP connection, past the greeting and capabilities negotiation."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        self._sock = sock
        self._file = sock.makefile("rb")
        self._timeout = timeout
        self.events: list[dict[str, Any]] = []
        self.greeting = self._read()
        if "QMP" not in self.greeting:
            raise QmpError(f"not a QMP greeting: {self.greeting}")
        self.execute("qmp_capabilities")

    @classmethod
    def connect(cls, path: Path, timeout: float = 30.0) -> Qmp:
        """Connect to ``path``, retrying while QEMU has not created or bound it yet."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QmpError(f"no QMP socket at {path} after {timeout:.0f} s") from None
                time.sleep(0.001)
        sock.settimeout(timeout)
        return cls(sock, timeout)

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except TimeoutError:
            raise QmpError(f"QEMU sent nothing for {self._timeout:.0f} s") from None
        if not line:
            raise QmpError("QEMU closed the QMP socket")
        message = json.loads(line)
        if not isinstance(message, dict):
            raise QmpError(f"not a QMP message: {line!r}")
        return message

    def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command`` and return its ``return`` value."""
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        self._sock.sendall(json.dumps(request).encode() + b"\n")
        while True:
            message = self._read()
            if "event" in message:
                self.events.append(message)
                continue
            if "error" in message:
                raise QmpError(f"QEMU refused {command}: {message['error'].get('desc', message)}")
            return message.get("return")

    def wait_event(self, name: str, timeout: float, **data: Any) -> dict[str, Any]:
        """The first event ``name`` whose data contains ``data`` (kept or still to come)."""
        deadline = time.monotonic() + timeout

        def matches(event: dict[str, Any]) -> bool:
            fields = event.get("data", {})
            return event["event"] == name and all(fields.get(k) == v for k, v in data.items())

        while True:
            for index, event in enumerate(self.events):
                if matches(event):
                    return self.events.pop(index)
            if time.monotonic() > deadline:
                raise QmpError(f"no {name} event {data or ''} within {timeout:.0f} s")
            message = self._read()
            if "event" in message:
                self.events.append(message)

    def close(self) -> None:
        self._file.close()
        self._sock.close()


__all__ = ["Qmp", "QmpError"]
