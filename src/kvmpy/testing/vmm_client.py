"""Driving a Vmm from a test: the test's steps on a client thread, the VMM on this one."""

from __future__ import annotations

import threading
from collections.abc import Callable

from kvmpy.vmm.actions import ActionError, Stop
from kvmpy.vmm.vmm import RunResult, Vmm


def run_with_client(vmm: Vmm, body: Callable[[], None], reason: str = "test over") -> RunResult:
    """Run ``body()`` on a client thread (the API's place) while the VMM serves on this one
    (the main thread: KVM's kick signal needs it), then stop the VM; re-raises what ``body`` raised."""
    raised: list[BaseException] = []

    def client() -> None:
        try:
            body()
        except BaseException as error:
            raised.append(error)
        finally:
            try:
                vmm.submit(Stop(reason))
            except ActionError:
                pass  # the VM had stopped already

    thread = threading.Thread(target=client)
    thread.start()
    result = vmm.run()
    thread.join(30)
    if raised:
        raise raised[0]
    return result


__all__ = ["run_with_client"]
