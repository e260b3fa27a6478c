"""A lab scenario driven through the API alone: configure, start, inspect, pause, resume, Ctrl-Alt-Del.

The VMM starts with nothing but ``--api-sock``; this driver runs beside it in
the lab, speaks HTTP on the socket the way a Firecracker client does, and
records what it saw as facts (one JSON object in the scenario's notes). The
guest (see ``API_COMMAND`` in the tests) prints the address of the kernel's
version banner from /proc/kallsyms, ticks once a second, reports its dmesg
warnings after the pause, and waits for Ctrl-Alt-Del, which the image's init
turns into a poweroff. Assertions stay with the test.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: How long the VM stays paused: longer than Linux's soft-lockup threshold (20 s by default).
PAUSE_SECONDS = 30.0
#: What Ctrl-Alt-Del does in the guest: the kernel restarting, or init's trap for SIGINT.
CTRL_ALT_DEL_EFFECT = r"reboot: Restarting system|kvmpy-init: ctrl-alt-del"


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket (the API's transport)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


class ApiDriver:
    def __init__(self, socket_path: str, console: Callable[[], str]) -> None:
        self.socket_path = socket_path
        self.console = console
        self.facts: dict[str, Any] = {}
        self._started = time.monotonic()

    def step(self, what: str) -> None:
        """A progress line in the lab's output (the batch's log shows how far a slow run got)."""
        print(f"kvmpy-scenario-step api {time.monotonic() - self._started:.0f} s: {what}", flush=True)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        connection = UnixHTTPConnection(self.socket_path)
        try:
            payload = json.dumps(body) if body is not None else None
            headers = {"Content-Type": "application/json"} if payload else {}
            connection.request(method, path, body=payload, headers=headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data else None
        finally:
            connection.close()

    def wait_for_socket(self, timeout: float = 60.0) -> float:
        started = time.monotonic()
        while not Path(self.socket_path).exists():
            if time.monotonic() - started > timeout:
                raise TimeoutError("the API socket never appeared")
            time.sleep(0.01)
        return time.monotonic() - started

    def wait_for(self, pattern: str, timeout: float = 240.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.console())
            if match is not None:
                return match
            time.sleep(0.2)
        raise TimeoutError(f"the guest never printed {pattern!r}")

    def boot(
        self, kernel: str, initrd: str | None, boot_args: str, cpus: int, memory_mib: int,
        devices: tuple[tuple[str, dict[str, Any]], ...] = (),
    ) -> None:  # fmt: skip
        """Configure the VM as a Firecracker client does (``devices``: PUTs before the start)
        and start it."""
        facts = self.facts
        facts["socket_seconds"] = round(self.wait_for_socket(), 3)
        facts["state_before"] = self.call("GET", "/")[1]["state"]
        facts["machine_config"] = self.call(
            "PUT", "/machine-config", {"vcpu_count": cpus, "mem_size_mib": memory_mib}
        )[0]
        boot: dict[str, Any] = {"kernel_image_path": kernel, "boot_args": boot_args}
        if initrd:
            boot["initrd_path"] = initrd
        facts["boot_source"] = self.call("PUT", "/boot-source", boot)[0]
        for path, body in devices:
            facts[f"put {path}"] = self.call("PUT", path, body)[0]
        facts["start"] = self.call("PUT", "/actions", {"action_type": "InstanceStart"})[0]
        facts["state_running"] = self.call("GET", "/")[1]["state"]
        self.step("started through the API")

    def vmm_pid(self) -> int:
        """The VMM's process id, from the API socket's peer credentials."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(self.socket_path)
            credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid: int = struct.unpack("3i", credentials)[0]
        return pid

    def drive(self, kernel: str, initrd: str | None, boot_args: str, cpus: int, memory_mib: int) -> None:
        facts = self.facts
        self.boot(kernel, initrd, boot_args, cpus, memory_mib)
        self._inspect()
        self.step("monitor answered")
        self._pause_and_resume()
        self.step("paused and resumed")
        facts["warnings"] = self.wait_for(r"LOCKUPS=(\d+) CLOCK=(\d+)", timeout=180).groups()
        self.wait_for("WAITING-FOR-CTRL-ALT-DEL", timeout=60)
        keyboard = [line for line in self.console().splitlines() if re.search("i8042|atkbd|input:", line)]
        facts["keyboard"] = keyboard[-6:]
        self.step("keyboard: " + " | ".join(keyboard[-6:]))
        facts["ctrl_alt_del"] = self.call("PUT", "/actions", {"action_type": "SendCtrlAltDel"})[0]
        self.step("Ctrl-Alt-Del sent")
        # Linux restarts at once while kernel.ctrl-alt-del is 1 (its default, which this init
        # leaves alone), or signals init if it is 0: either is "as Linux is configured to".
        try:
            effect = self.wait_for(CTRL_ALT_DEL_EFFECT, timeout=120).group(0)
        except TimeoutError:
            effect = ""
            facts["console_tail"] = self.console()[-1500:]
            # End now rather than at the scenario's timeout.
            self.call("PUT", "/kvmpy/stop", {"reason": "Ctrl-Alt-Del had no effect"})
        facts["ctrl_alt_del_effect"] = effect
        self.step(f"Ctrl-Alt-Del's effect: {effect or 'none'}")

    def _inspect(self) -> None:
        facts = self.facts
        gva = self.wait_for(r"BANNER_GVA=([0-9a-f]{16})").group(1)
        facts["banner_gva"] = gva
        status, walk = self.call("GET", f"/kvmpy/translate?gva=0x{gva}&vcpu=0")
        facts["translate_status"] = status
        facts["translate"] = walk
        gpa = walk.get("gpa") if isinstance(walk, dict) else None
        if isinstance(gpa, int):
            status, memory = self.call("GET", f"/kvmpy/memory?address={gpa:#x}&length=64&space=gpa")
            facts["banner_bytes"] = memory
        status, regs = self.call("GET", "/kvmpy/regs?vcpu=0")
        facts["regs_status"], facts["regs"] = status, regs
        first = self.call("GET", "/kvmpy/stats")[1]
        time.sleep(5)
        second = self.call("GET", "/kvmpy/stats")[1]
        facts["stats"] = [first, second]

    def _pause_and_resume(self) -> None:
        facts = self.facts
        self.wait_for(r"tick 3\b")
        facts["pause"] = self.call("PATCH", "/vm", {"state": "Paused"})[0]
        facts["state_paused"] = self.call("GET", "/")[1]["state"]
        time.sleep(1)  # the last line in flight reaches the console
        before = self.console()
        time.sleep(PAUSE_SECONDS)
        facts["console_grew_while_paused"] = len(self.console()) - len(before)
        facts["resume"] = self.call("PATCH", "/vm", {"state": "Resumed"})[0]
        facts["state_resumed"] = self.call("GET", "/")[1]["state"]
        ticks = [int(n) for n in re.findall(r"tick (\d+)", before)]
        last = max(ticks) if ticks else 0
        self.wait_for(rf"tick {last + 2}\b", timeout=60)
        facts["ticks_after_resume"] = [int(n) for n in re.findall(r"tick (\d+)", self.console())]


__all__ = ["PAUSE_SECONDS", "ApiDriver", "UnixHTTPConnection"]
