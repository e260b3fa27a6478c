"""vhost-net's choice and options (its data path runs in the lab: tests/test_lab_linux.py, vhost_net).

This host has no /dev/vhost-net, so what is checked here is what kvmpy decides before any
ring exists: which back end ``vhost=auto|on|off`` takes, and the options that cannot go
with the kernel's data plane.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmpy.abi import vhost as vh
from kvmpy.errors import ConfigError
from kvmpy.virtio.vhost import net as vhost_net
from kvmpy.vmm.config import NetConfig


def test_vhost_options() -> None:
    assert NetConfig.parse("tap=t0").vhost == "auto"
    assert NetConfig.parse("tap=t0,vhost=on").vhost == "on"
    assert NetConfig.parse("tap=t0,vhost=off,bandwidth=1M").rx_rate_limiter is not None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tap=t0,vhost=yes", "invalid --net option 'vhost=yes'"),
        ("tap=t0,vhost=on,ops=100", "cannot be rate-limited by kvmpy"),
    ],
)
def test_bad_vhost_options(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NetConfig.parse(text)


def test_auto_takes_vhost_where_the_device_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vhost_net, "VHOST_NET", str(tmp_path / "vhost-net"))
    assert not vhost_net.vhost_net_usable()
    (tmp_path / "vhost-net").touch()
    assert vhost_net.vhost_net_usable()


def test_opening_a_missing_vhost_device_is_one_line(tmp_path: Path) -> None:
    from kvmpy.virtio.vhost.kernel import KernelVhost

    with pytest.raises(ConfigError, match=r"cannot open .*vhost-net: No such file .*is vhost_net loaded"):
        KernelVhost(str(tmp_path / "vhost-net"))


def test_ioctl_numbers_match_the_kernel_header() -> None:
    """The values <linux/vhost.h> gives on x86-64 (the abi module asserts four more)."""
    assert vh.VHOST_GET_FEATURES == 0x8008AF00
    assert vh.VHOST_SET_FEATURES == 0x4008AF00
    assert vh.VHOST_SET_VRING_ADDR == 0x4028AF11
    assert vh.VHOST_SET_VRING_KICK == 0x4008AF20
    assert vh.VHOST_SET_VRING_CALL == 0x4008AF21


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ("3", "invalid --vsock '3': use cid=N"),
        ("cid=x", "use cid=N"),
        ("cid=2", "vsock CID 2 is not a guest's"),
    ],
)
@pytest.mark.kvm
def test_bad_vsock_options_are_one_line(guests: Path, option: str, message: str) -> None:
    from kvmpy.testing.process import kvmpy

    done = kvmpy("run", "--kernel", str(guests / "hello.elf"), "--vsock", option)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr


def test_vsock_without_vhost_vsock_is_one_line(tmp_path: Path) -> None:
    from kvmpy.virtio.vhost.vsock import VhostVsock

    with pytest.raises(ConfigError, match="cannot open .*: No such file .*is vhost_vsock loaded"):
        VhostVsock(3, lambda fd, handler: None, lambda fd: None, vhost_path=str(tmp_path / "vhost-vsock"))


def test_a_paused_vsock_stops_the_kernel_and_goes_on_from_where_it_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Pausing the VM stops vhost-vsock (SET_RUNNING 0, the rings' bases read back into kvmpy's
    queues) so no connection's bytes land in a paused guest; resume hands the rings over again."""
    from kvmpy.memory.guest_memory import GuestMemory
    from kvmpy.testing.fakes import FakeKernelVhost
    from kvmpy.testing.virtio_driver import TransportDriver
    from kvmpy.virtio import pci_transport as vp
    from kvmpy.virtio.device import F_VERSION_1
    from kvmpy.virtio.vhost import vsock

    running: list[int] = []
    monkeypatch.setattr(vsock, "KernelVhost", FakeKernelVhost)

    def ioctl(fd: int, request: int, argument: bytes) -> None:
        if request == vh.VHOST_VSOCK_SET_RUNNING:
            running.append(argument[0])

    monkeypatch.setattr(vsock.fcntl, "ioctl", ioctl)
    mem = GuestMemory.anonymous([(0, 1 << 24)])
    device = vsock.VhostVsock(3, lambda fd, handler: None, lambda fd: None)
    transport = vp.VirtioPciTransport(
        device, mem, None, 0xC001_0000, 0xC001_0000 + vp.BAR0_SIZE, lambda areas: None  # type: ignore[arg-type]
    )
    pci = TransportDriver(transport, mem)
    pci.negotiate(F_VERSION_1)
    queues = [pci.setup_queue(index, 0x10000 + 0x4000 * index, 16) for index in range(3)]
    pci.driver_ok()
    kernel: FakeKernelVhost = device._vhost  # type: ignore[assignment]
    assert running == [1] and kernel.bases == {0: 0, 1: 0}
    mem.write_u16(queues[0].used + 2, 3)  # the kernel used three receive buffers...
    kernel.bases[0] = 3  # ...and took them
    device.pause()
    assert running == [1, 0] and kernel.stops == 2
    assert (transport.queues[0].last_avail_idx, transport.queues[0].next_used_idx) == (3, 3)
    device.pause()  # twice is once
    assert kernel.stops == 2
    device.resume()
    assert running == [1, 0, 1] and kernel.bases == {0: 3, 1: 0}
    device.close()
    mem.close()
