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
