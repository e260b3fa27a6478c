"""The vCPU exit path's pieces that need no guest: KVM_RUN's failures, and how a stop reaches the loop."""

from __future__ import annotations

import errno
from types import SimpleNamespace

import pytest

from kvmpy.abi import kvm as abi
from kvmpy.bus import Bus
from kvmpy.kvm.errors import KvmError
from kvmpy.kvm.vcpu import Vcpu
from kvmpy.vmm.vcpu_thread import VcpuThread


@pytest.mark.parametrize("code", [errno.EINTR, errno.EAGAIN])
def test_kvm_run_ended_by_a_signal_is_an_interrupted_exit(code: int) -> None:
    assert Vcpu.interrupted(OSError(code, "interrupted")) == abi.KVM_EXIT_INTR


def test_any_other_kvm_run_failure_is_raised() -> None:
    with pytest.raises(KvmError, match="KVM_RUN"):
        Vcpu.interrupted(OSError(errno.EFAULT, "bad address"))


class _FakeVcpu:
    id = 0

    def __init__(self) -> None:
        self.immediate_exit: list[bool] = []

    def set_immediate_exit(self, value: bool) -> None:
        self.immediate_exit.append(value)


def _thread() -> tuple[VcpuThread, _FakeVcpu]:
    machine = SimpleNamespace(pio_bus=Bus("pio"), mmio_bus=Bus("mmio"), pause_requested=False)
    vcpu = _FakeVcpu()
    return VcpuThread(machine, vcpu), vcpu  # type: ignore[arg-type]


def test_serving_a_request_clears_control() -> None:
    thread, vcpu = _thread()
    done: list[str] = []
    thread._requests.append(lambda: done.append("work"))
    thread.control = True
    thread._serve_control()
    assert done == ["work"]
    assert thread.control is False
    assert vcpu.immediate_exit == [False]


def test_a_stop_keeps_control_set_so_the_loop_sees_it() -> None:
    """The loop looks at ``stopping`` only when ``control`` is set: serving requests must not
    clear ``control`` once a stop was asked for, or the vCPU would re-enter KVM_RUN for good
    (with immediate_exit set, each KVM_RUN returning at once)."""
    thread, vcpu = _thread()
    thread.stopping = True
    thread.control = True
    thread._serve_control()
    assert thread.control is True
    assert vcpu.immediate_exit == [True]
